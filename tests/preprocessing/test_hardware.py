import pytest
import torch

from vmem.preprocessing.hardware import (
    EMULATED_DEFAULTS,
    detect_hardware,
    emulated_spec,
    pcie_bandwidth,
)


def test_emulated_spec_defaults():
    spec = emulated_spec()
    assert spec.emulated and spec.name == "emulated (cpu)"
    assert spec.total_memory == EMULATED_DEFAULTS["memory"] == 16 * 2**30
    assert spec.h2d_bandwidth == spec.d2h_bandwidth == 12e9
    assert spec.link_bandwidth == pytest.approx(pcie_bandwidth(3, 16))


def test_cpu_device_gives_the_emulated_spec_with_environment_overrides(monkeypatch):
    monkeypatch.setenv("VMEM_EMULATED_DEVICE", "memory=12GiB, h2d=6e9, flops=2e12")
    spec = detect_hardware("cpu")
    assert spec.emulated
    assert (spec.total_memory, spec.h2d_bandwidth, spec.d2h_bandwidth, spec.compute_rate) == \
        (12 * 2**30, 6e9, 12e9, 2e12)


@pytest.mark.parametrize("bad", ["mem=3", "memory=0.5", "h2d=fast", "flops=-1", "memory"])
def test_bad_override_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="VMEM_EMULATED_DEVICE"):
        emulated_spec(bad)


def test_pcie_bandwidth():
    assert pcie_bandwidth(5, 16) == pytest.approx(63.0e9, rel=0.001)
    assert pcie_bandwidth(4, 16) == pytest.approx(31.5e9, rel=0.001)
    assert pcie_bandwidth(None, 16) is None and pcie_bandwidth(4, 0) is None


def test_spec_summary_and_json():
    spec = emulated_spec()
    assert "PCIe 3.0 x16" in spec.summary() and '"emulated": true' in spec.to_json()


@pytest.mark.gpu
def test_cuda_spec_reads_nvml_and_measures():
    spec = detect_hardware("cuda")
    assert not spec.emulated
    assert spec.total_memory == torch.cuda.get_device_properties(0).total_memory
    assert spec.pcie_generation is not None and spec.pcie_width is not None
    assert spec.h2d_bandwidth > 1e9 and spec.d2h_bandwidth > 1e9 and spec.compute_rate > 1e12
    assert detect_hardware("cuda") is spec  # cached per device
