"""The timeline simulator: streams, stalls, the throttled memory curve, the trace."""

import json

import pytest
import torch

from vmem import BudgetTooSmall, models
from vmem.control import make_plan
from vmem.control.simulator import LAUNCH_S, simulate
from vmem.preprocessing import profile_network
from vmem.preprocessing.hardware import emulated_spec

SLOW, FAST = emulated_spec("h2d=2e9,d2h=2e9,flops=1e13"), emulated_spec("h2d=1e12,d2h=1e12")


@pytest.fixture(scope="module")
def prof():
    return profile_network(models.resnet18(), (32, 3, 112, 112))


def test_plain_step_is_compute_alone(prof):
    plan = make_plan(prof, budget=None, policy="none")
    sim = simulate(prof, plan, FAST)
    ops = len(prof.timeline.memory)
    flops = sum(layer.forward_flops + layer.backward_flops for layer in prof.layers)
    assert sim.d2h_s == sim.h2d_s == sim.stall_s == 0
    assert sim.iteration_s == pytest.approx(flops / FAST.compute_rate + ops * LAUNCH_S)
    assert sim.peak_bytes == plan.predicted_peak


def test_slower_links_stall_more_and_faster_ones_hide_the_copies(prof):
    plan = make_plan(prof, budget=None, policy="vdnn_all")
    slow, fast = simulate(prof, plan, SLOW), simulate(prof, plan, FAST)
    assert slow.stall_s > fast.stall_s >= 0
    assert slow.iteration_s > fast.iteration_s >= fast.compute_s
    assert fast.iteration_s <= 1.05 * fast.compute_s
    assert slow.d2h_s == pytest.approx(plan.offloaded_bytes / 2e9, rel=0.25)  # duplex: slower


def test_compute_waits_for_copies_out_rather_than_pass_the_target(prof):
    with pytest.raises(BudgetTooSmall) as info:
        make_plan(prof, budget=1, policy="vdnn_all")
    plan = make_plan(prof, budget=int(info.value.minimum * 1.02), policy="vdnn_all")
    sim = simulate(prof, plan, SLOW)
    assert sim.peak_bytes <= plan.target
    unthrottled = simulate(prof, make_plan(prof, budget=None, policy="vdnn_all"), SLOW)
    assert unthrottled.peak_bytes > plan.target  # copies out lag: memory goes late
    assert sim.iteration_s >= unthrottled.iteration_s  # waiting never makes it faster


def test_trace_has_the_three_streams_and_the_memory_counter(prof, tmp_path):
    plan = make_plan(prof, budget=None, policy="vdnn_conv")
    path = tmp_path / "plan.json"
    simulate(prof, plan, SLOW).write_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    threads = {e["args"]["name"] for e in events if e["ph"] == "M"}
    assert threads == {"compute", "d2h", "h2d"}
    spans = [e for e in events if e["ph"] == "X"]
    assert {e["tid"] for e in spans} == {1, 2, 3}
    assert all(e["dur"] >= 0 for e in spans)
    assert max(e["args"]["bytes"] for e in events if e["ph"] == "C") > 0


def test_make_plan_with_hardware_carries_the_predicted_time(prof):
    plan = make_plan(prof, budget=int(prof.peak_bytes * 0.85), policy="auto", spec=SLOW)
    assert plan.predicted_seconds == pytest.approx(simulate(prof, plan, SLOW).iteration_s)
    assert "predicted step time" in plan.table()
    assert torch.isfinite(torch.tensor(plan.predicted_seconds))
