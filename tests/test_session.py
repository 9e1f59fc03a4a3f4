"""vmem.session end to end on the emulated device: exactness, the budget, the lifecycle."""

import contextlib
import json

import pytest
import torch
from nets import NETS, SHAPE, build
from torch import nn

import vmem
from vmem import BudgetTooSmall

POLICIES = ["vdnn_all", "vdnn_conv", "recompute", "auto"]


def train(model, steps=3, after_backward=None, **session):
    """SGD with momentum for ``steps`` steps on seeded data; what a test compares.
    ``after_backward(session)`` runs after each backward, if given."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = torch.Generator().manual_seed(1)
    losses, grads = [], []
    with vmem.session(model, optimizer=opt, **session) as s:
        for _ in range(steps):
            x = torch.randn(SHAPE, generator=data)
            y = torch.randint(0, 10, (SHAPE[0],), generator=data)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            # The test's own copies are not the model's memory.
            with s.meter.paused() if s.meter else contextlib.nullcontext():
                losses.append(loss.detach().clone())
                grads.append([p.grad.detach().clone() for p in model.parameters()])
            if after_backward is not None:
                after_backward(s)
            opt.step()
            opt.zero_grad()
    return s, losses, grads


def minimum_budget(name: str, policy: str) -> int:
    """The smallest budget vmem names for the first step of :func:`train` (which holds its
    labels on the device besides what a sample shows)."""
    model = build(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with pytest.raises(BudgetTooSmall) as sampled:  # planned up front from the sample
        with vmem.session(model, optimizer=opt, budget=1, policy=policy, split=1,
                          sample=torch.randn(SHAPE)):
            pass
    with pytest.raises(BudgetTooSmall) as info:  # planned at the first forward
        train(build(name), budget=sampled.value.minimum - 1, policy=policy, split=1)
    return info.value.minimum


def plain_peak(name: str) -> int:
    s, _, _ = train(build(name), steps=1, policy="none")
    return s.plan.predicted_peak


def budgets(name: str, policy: str) -> list[int]:
    """The policy's minimum, the plain peak with headroom, and midway."""
    low = minimum_budget(name, policy)
    high = max(low, int(plain_peak(name) * 1.05))
    return [low, (low + high) // 2, high]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", list(NETS))
def test_bit_identical_to_plain_pytorch_at_three_budgets(name, policy):
    if (name, policy) == ("saved_twice", "recompute"):  # one layer: no block to rerun
        with pytest.raises(ValueError, match="no block whose recomputation frees anything"):
            train(build(name), budget="1GiB", policy=policy)
        return
    baseline = build(name)
    _, losses, grads = train(baseline)
    for budget in budgets(name, policy):
        model = build(name)
        s, got_losses, got_grads = train(model, budget=budget, policy=policy)
        assert all(torch.equal(a, b) for a, b in zip(losses, got_losses, strict=True))
        for step, (want, got) in enumerate(zip(grads, got_grads, strict=True)):
            assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True)), step
        for (key, a), b in zip(baseline.state_dict().items(), model.state_dict().values(),
                               strict=True):
            assert torch.equal(a, b), key  # parameters and BatchNorm running statistics
        assert s.peak <= budget


@pytest.mark.parametrize("policy", ["auto", "vdnn_all"])
@pytest.mark.parametrize("name", ["resnet", "vgg_bn"])
def test_measured_peak_within_budget_and_prediction(name, policy):
    low, high = budgets(name, policy)[::2]
    offloaded = []
    for step in range(6):
        budget = low + (high - low) * step // 5
        s, _, _ = train(build(name), budget=budget, policy=policy)
        assert s.peak <= budget
        assert abs(s.plan.predicted_peak - s.peak) <= 0.05 * s.peak
        offloaded.append(s.executor.offloaded_bytes)
    assert offloaded[0] > 0


@pytest.mark.parametrize("name", list(NETS))
def test_below_minimum_raises_before_the_first_step(name):
    low = minimum_budget(name, "auto")
    model = build(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BudgetTooSmall) as info:
        train(model, budget=low - 4096, policy="auto", split=1)
    err = info.value
    assert err.minimum == low and err.layer and str(low) in str(err)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               and not m._backward_pre_hooks for m in model.modules())


def test_session_leaves_no_trace_on_normal_exit_and_on_exception():
    baseline = build("resnet")
    train(baseline)
    model = build("resnet")
    train(model, budget=minimum_budget("resnet", "auto"), policy="auto")
    assert _no_hooks(model)

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with vmem.session(model, policy="vdnn_all"):
            model(torch.randn(SHAPE)).sum().backward()
            raise Boom
    assert _no_hooks(model)
    model.zero_grad(set_to_none=True)
    baseline.zero_grad(set_to_none=True)
    x = torch.randn(SHAPE)
    model(x).sum().backward()  # one more plain step
    baseline(x).sum().backward()
    assert all(torch.equal(p.grad, q.grad)
               for p, q in zip(model.parameters(), baseline.parameters(), strict=True))


def test_without_budget_or_policy_nothing_changes(monkeypatch):
    monkeypatch.delenv("VMEM_DEVICE_BUDGET", raising=False)
    monkeypatch.delenv("VMEM_POLICY", raising=False)
    model = build("vgg_bn")
    with vmem.session(model) as s:
        assert _no_hooks(model)
        model(torch.randn(SHAPE)).sum().backward()
    assert s.plan is None and "nothing changed" in s.report()


def test_budget_and_policy_from_the_environment(monkeypatch):
    monkeypatch.setenv("VMEM_DEVICE_BUDGET", str(plain_peak("vgg_bn") * 2))
    monkeypatch.setenv("VMEM_POLICY", "vdnn_conv")
    s, _, _ = train(build("vgg_bn"), steps=1)
    assert s.policy == "vdnn_conv" and s.plan.offloaded > 0


def test_sample_plans_up_front_and_a_new_shape_replans():
    model = build("resnet")
    with vmem.session(model, policy="vdnn_all", sample=torch.randn(SHAPE)) as s:
        first = s.plan
        assert first is not None and s.steps == 0
        model(torch.randn(SHAPE)).sum().backward()
        assert s.plan is first
        model(torch.randn(4, 3, 32, 32)).sum().backward()
        assert s.plan is not first and s.plan.saves[0].nbytes == first.saves[0].nbytes // 2


def test_host_pool_is_reused_across_steps():
    s, _, _ = train(build("resnet"), steps=4, policy="vdnn_all")
    stats = s.pools.host.stats
    assert stats.arena_allocations == 1 and stats.overflow_allocations == 0
    assert stats.slices == 4 * s.plan.offloaded and stats.in_use == 0
    assert s.executor.offloaded_bytes == 4 * s.plan.offloaded_bytes
    # The input batch stays (the loop holds it); everything offloaded comes back by copy.
    assert s.executor.reused_bytes == 0
    assert s.executor.prefetched_bytes == s.executor.offloaded_bytes
    assert s.pools.staging.stats.prefetched > 0


def test_report_and_json_report(tmp_path):
    path = tmp_path / "report.json"
    s, _, _ = train(build("vgg_bn"), policy="vdnn_all", report=str(path))
    text = s.report()
    assert "measured peak" in text and "host pool" in text and "Memmax" in text
    data = json.loads(path.read_text())
    assert data["measured_peak"] == s.peak and data["plan"]["policy"] == "vdnn_all"
    assert vmem.Plan.from_json(json.dumps(data["plan"])) == s.plan
    assert data["backend"] == s.backend.name and f"{s.backend.name} transfer backend" in text
    if s.backend.name == "native":  # its arena backs the host pool
        assert data["native_arena"]["peak_in_use"] >= data["host_pool"]["capacity"] > 0
        assert data["native_arena"]["reserved"] == 0  # given back as the session ended


@pytest.mark.parametrize("kwargs, error, match", [
    ({"budget": "8 GiBs"}, ValueError, "unknown unit"),
    ({"budget": -5}, ValueError, "must be positive"),
    ({"budget": "32GiB"}, ValueError, "above the device's memory"),
    ({"policy": "fastest"}, ValueError, "is not one of"),
    ({"budget": "1GiB", "prefetch": 2}, TypeError, "unknown vmem option"),
])
def test_bad_input_is_a_clear_error(kwargs, error, match):
    model = build("vgg_bn")
    with pytest.raises(error, match=match):
        with vmem.session(model, **kwargs):
            pass
    assert _no_hooks(model)


def test_a_non_module_is_a_clear_error():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        vmem.session(lambda x: x, budget="1GiB")


@pytest.mark.parametrize("policy", ["none", "vdnn_all", "auto"])
def test_forwards_without_backward_leave_nothing_behind(policy):
    """Evaluation with gradients on: each forward's graph, kept saves included, is freed
    with its output (see Note: [A kept save holds no graph])."""
    model = build("resnet")
    with vmem.session(model, budget="1GiB", policy=policy) as s:
        model(torch.randn(SHAPE))  # plans, then frees its graph
        after_first = s.meter.current
        for _ in range(3):
            model(torch.randn(SHAPE))
        assert s.meter.current == after_first
