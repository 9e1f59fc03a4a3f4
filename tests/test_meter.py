import pytest
import torch

from vmem import OutOfBudget
from vmem.meter import CudaMeter, DeviceMeter, EmulatedMeter


def test_counts_allocations_and_frees():
    with DeviceMeter.for_device("cpu") as meter:
        a = torch.empty(1000)  # 4000 bytes
        b = torch.empty(500, dtype=torch.float64)  # 4000 bytes
        assert meter.current == 8000
        del a
        assert meter.current == 4000
        c = b * 2
        assert meter.current == 8000
        del b, c
    assert meter.current == 0
    assert meter.peak == 8000


def test_views_and_inplace_add_nothing_and_storages_count_once():
    x = torch.randn(64, 64)
    with DeviceMeter.for_device("cpu") as meter:
        meter.track([x])
        assert meter.current == 64 * 64 * 4
        v = x.t()[3:]
        x.mul_(2)
        x.relu_()
        w = v.view(-1) if v.is_contiguous() else v.reshape(-1)  # reshape of a view copies
        expected = 64 * 64 * 4 + (0 if w.untyped_storage()._cdata == x.untyped_storage()._cdata
                                  else w.numel() * 4)
        assert meter.current == expected
        meter.track([x])  # tracking twice counts once
        assert meter.current == expected


def test_pre_existing_tensors_count_only_when_tracked():
    weight = torch.randn(256, 256)
    with DeviceMeter.for_device("cpu") as meter:
        out = weight @ weight
        assert meter.current == out.numel() * 4
        meter.track([weight])
        assert meter.current == 2 * out.numel() * 4


def test_excluded_storage_never_counts():
    with DeviceMeter.for_device("cpu") as meter:
        pinned_stand_in = torch.empty(1 << 20, dtype=torch.uint8)
        assert meter.current == 1 << 20
        meter.exclude(pinned_stand_in)
        assert meter.current == 0
        pinned_stand_in.add_(1)
        assert meter.current == 0


def test_backward_allocations_are_counted():
    w = torch.randn(128, 128, requires_grad=True)
    with DeviceMeter.for_device("cpu") as meter:
        meter.track([w])
        (w @ w).sum().backward()  # grad of w is created in backward
    assert w.grad is not None
    assert meter.current == 2 * 128 * 128 * 4
    assert meter.peak >= 3 * 128 * 128 * 4


def test_limit_raises_out_of_budget_naming_the_layer_and_bytes():
    with pytest.raises(OutOfBudget) as info:
        with DeviceMeter.for_device("cpu", limit=10_000, where=lambda: "features.3"):
            live = [torch.empty(1000), torch.empty(2000)]  # 4000 + 8000 bytes: over the limit
        del live
    err = info.value
    assert err.layer == "features.3" and err.limit == 10_000 and err.used == 12_000
    assert "features.3" in str(err) and "12000 bytes" in str(err)


def test_limit_without_layer_names_the_operator():
    with pytest.raises(OutOfBudget, match=r"aten\.ones"):
        with DeviceMeter.for_device("cpu", limit=100):
            torch.ones(1000)


def test_other_devices_are_not_counted():
    with DeviceMeter.for_device("meta") as meter:
        torch.empty(1000)  # cpu
        torch.empty(1000, device="meta")
    assert meter.peak == 4000


def test_picks_the_meter_by_device():
    assert isinstance(DeviceMeter.for_device("cpu"), EmulatedMeter)
    assert isinstance(DeviceMeter.for_device("cuda"), CudaMeter)


@pytest.mark.gpu
def test_cuda_meter_reads_the_allocator():
    with DeviceMeter.for_device("cuda") as meter:
        base = meter.current
        x = torch.empty(1 << 20, device="cuda")
        assert meter.current - base == x.numel() * 4
        assert meter.peak >= base + (1 << 22)
    with pytest.raises(OutOfBudget):
        with DeviceMeter.for_device("cuda", limit=torch.cuda.memory_allocated() + 1024):
            torch.empty(1 << 20, device="cuda")


def test_a_window_measures_its_own_peak_and_the_meter_keeps_the_whole():
    with DeviceMeter.for_device("cpu") as meter:
        a = torch.empty(3000)  # 12000 bytes, then freed: before the window
        del a
        b = torch.empty(1000)
        meter.start_window()
        assert meter.window_peak == 4000
        c = torch.empty(500)
        del c
    assert (meter.window_peak, meter.peak) == (6000, 12000)
    del b


@pytest.mark.gpu
def test_cuda_meters_keep_the_peak_from_before_a_window():
    first, second = DeviceMeter.for_device("cuda"), DeviceMeter.for_device("cuda")
    first.reset_peak()
    base = first.current
    x = torch.empty(1 << 20, device="cuda")
    del x
    first.start_window()  # torch's own peak statistic starts again here
    assert first.window_peak < base + (1 << 22) <= second.peak
    assert second.reserved_peak >= torch.cuda.max_memory_reserved()
