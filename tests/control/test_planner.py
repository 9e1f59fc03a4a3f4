import pytest
import torch
from nets import NETS, SHAPE, build

from vmem import BudgetTooSmall, Plan, models
from vmem.control import make_plan
from vmem.control.memory import MemoryModel
from vmem.control.planner import MIN_BYTES
from vmem.control.segments import segment_of_layers
from vmem.preprocessing import profile_network
from vmem.preprocessing.optimizer import profile_optimizer

CASES = [("resnet", SHAPE), ("vgg_bn", SHAPE), ("saved_twice", SHAPE)]


def _profile(name, shape):
    model = build(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return profile_network(model, shape), profile_optimizer(opt)


def test_segments_start_at_each_convolution():
    prof = profile_network(models.resnet18(), (1, 3, 64, 64))
    segments = segment_of_layers(prof.layers)
    starts = [layer.name for layer, seg, prev in zip(prof.layers, segments, [-1] + segments[:-1],
                                                     strict=True)
              if seg != prev]
    assert starts[:4] == ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1"]
    assert "layer2.0.downsample.0" in starts  # the residual branch's convolution
    assert len(starts) == 20  # ResNet-18 has 20 convolutions
    assert segments == sorted(segments)


@pytest.mark.parametrize("name, shape", CASES)
def test_offloading_more_never_raises_the_curve(name, shape):
    prof, _ = _profile(name, shape)
    model = MemoryModel(prof, segment_of_layers(prof.layers), MIN_BYTES)
    everything = list(range(len(model.saves)))
    plain = model.curve([], 1)
    for distance in (1, 2, 4):
        for k in range(0, len(everything) + 1, max(1, len(everything) // 5)):
            assert bool((model.curve(everything[:k], distance) <= plain).all())
    assert bool((model.curve(everything, 1) <= model.curve(everything, 3)).all())


@pytest.mark.parametrize("name, shape", CASES)
def test_smaller_budget_never_predicts_more_nor_offloads_less(name, shape):
    prof, opt = _profile(name, shape)
    plain = make_plan(prof, budget=None, policy="none", optimizer=opt).predicted_peak
    with pytest.raises(BudgetTooSmall) as info:
        make_plan(prof, budget=1, policy="auto", optimizer=opt)
    low = info.value.minimum
    previous = None
    for step in range(11):
        budget = int(plain * 1.1) - (int(plain * 1.1) - low) * step // 10
        plan = make_plan(prof, budget=budget, policy="auto", optimizer=opt)
        assert plan.predicted_peak <= plan.target <= budget
        if previous is not None:
            assert plan.predicted_peak <= previous.predicted_peak
            assert plan.offloaded_bytes >= previous.offloaded_bytes
        previous = plan
    with pytest.raises(BudgetTooSmall):
        make_plan(prof, budget=low - 1, policy="auto", optimizer=opt)


@pytest.mark.parametrize("name, shape", CASES)
def test_auto_is_feasible_whenever_a_fixed_policy_is(name, shape):
    prof, opt = _profile(name, shape)
    for policy in ("vdnn_all", "vdnn_conv", "none"):
        fixed = make_plan(prof, budget=None, policy=policy, optimizer=opt)
        budget = int(fixed.predicted_peak / 0.98) + 1
        auto = make_plan(prof, budget=budget, policy="auto", optimizer=opt)
        assert auto.predicted_peak <= budget


def test_policies_choose_what_they_say():
    prof, opt = _profile("vgg_bn", SHAPE)
    none = make_plan(prof, budget=None, policy="none", optimizer=opt)
    every = make_plan(prof, budget=None, policy="vdnn_all", optimizer=opt)
    conv = make_plan(prof, budget=None, policy="vdnn_conv", optimizer=opt)
    assert none.offloaded == 0
    assert every.offloaded == len(every.saves) > conv.offloaded > 0
    conv_layers = {layer.name for layer in prof.layers if layer.kind == "Conv2d"}
    # what vdnn_conv offloads is saved by a convolution (first by the ReLU before it, often)
    assert {d.layer for d in conv.saves if d.action == "offload"} <= conv_layers | {
        layer.name for layer in prof.layers if layer.kind in ("ReLU", "MaxPool2d")}
    assert all(d.nbytes >= MIN_BYTES for d in every.saves)


def test_budget_too_small_names_minimum_and_layer():
    prof, opt = _profile("resnet", SHAPE)
    with pytest.raises(BudgetTooSmall) as info:
        make_plan(prof, budget=10**6, policy="vdnn_all", optimizer=opt)
    err = info.value
    assert err.budget == 10**6 and err.minimum > 10**6
    assert err.layer in {layer.name for layer in prof.layers} | {"optimizer.step"}
    plan = make_plan(prof, budget=err.minimum, policy="vdnn_all", optimizer=opt)
    assert plan.predicted_peak <= plan.target


def test_plan_json_round_trip_and_table():
    prof, opt = _profile("resnet", SHAPE)
    plan = make_plan(prof, budget=None, policy="vdnn_all", optimizer=opt, prefetch_distance=2)
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.prefetch_distance == 2
    table = plan.table()
    assert "Memmax plain" in table and "prefetch distance 2" in table
    assert len(plan.segments) == sum(1 for layer in prof.layers if layer.kind == "Conv2d")


@pytest.mark.parametrize("name", list(NETS))
def test_memmax_per_segment_bounds_the_peak(name):
    prof, opt = _profile(name, SHAPE)
    plan = make_plan(prof, budget=None, policy="vdnn_all", optimizer=opt)
    assert max(s.memmax for s in plan.segments) <= plan.predicted_peak
    assert all(s.memmax <= s.memmax_plain for s in plan.segments)


@pytest.mark.parametrize("density, compressed", [(0.3, True), (0.95, False), (None, False)])
def test_compression_only_where_the_measured_density_pays(density, compressed):
    profile, _ = _profile("resnet", SHAPE)
    for save in profile.timeline.saves:
        save.density = density
    plain = make_plan(profile, budget=None, policy="vdnn_all")
    plan = make_plan(profile, budget=None, policy="vdnn_all", compress=True)
    assert not any(d.compress for d in plain.saves)
    assert any(d.compress for d in plan.saves) == compressed
    if compressed:  # fp32 at 30%: 0.3 * 4 + 1/8 bytes per element
        ratio = plan.offloaded_bytes / plan.link_bytes
        assert 2.9 < ratio < 3.1
        assert plan.host_bytes > plan.offloaded_bytes  # slots hold the worst case
        assert "compressed" in plan.table()


def test_compression_shortens_a_link_bound_simulated_step():
    from vmem.preprocessing.hardware import emulated_spec

    spec = emulated_spec("h2d=1e9,d2h=1e9")  # a slow link
    profile, _ = _profile("resnet", SHAPE)
    for save in profile.timeline.saves:
        save.density = 0.3
    raw = make_plan(profile, budget=None, policy="vdnn_all", spec=spec)
    packed = make_plan(profile, budget=None, policy="vdnn_all", spec=spec, compress=True)
    assert packed.predicted_seconds < raw.predicted_seconds
