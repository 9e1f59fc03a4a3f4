"""install(): the plan, and nothing else, put in force on a model, and taken away again."""

import functools

import pytest
import torch
from nets import SHAPE, build

from vmem.control import Plan
from vmem.feedforward import HostPool, Pools, StagingPool, install
from vmem.planning import plan_model
from vmem.preprocessing.keys import ModuleScope
from vmem.transfer import make_backend

CPU = torch.device("cpu")


@functools.cache
def _split_plan() -> Plan:
    """A plan that splits runs of ``vgg_bn``: offloading alone does not fit 0.6 of plain."""
    model, x = build("vgg_bn"), torch.randn(SHAPE)
    plain = plan_model(model, (x,), budget=None, policy="none", headroom=(0.02, 0))
    plan = plan_model(model, (x,), budget=int(plain.plan.predicted_peak * 0.6), policy="auto",
                      headroom=(0.02, 0)).plan
    assert any(split.parts > 1 for split in plan.splits)
    return plan


def _train(model, plan, steps=2):
    backend = make_backend("torch", CPU)
    installed = install(model, plan, Pools(HostPool(backend.host_buffer), StagingPool()),
                        backend, scope=ModuleScope(model))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(3)
    with installed:
        for _ in range(steps):
            x = torch.randn(SHAPE, generator=g)
            installed.executor.start_forward({t.untyped_storage()._cdata for t in [
                *model.parameters(), *model.buffers(), x]})
            with installed.executor.hooks():
                out = model(x)
            installed.executor.end_forward()
            out.square().mean().backward()
            opt.step()
            opt.zero_grad()
    installed.uninstall()
    return installed


def test_a_plan_read_back_from_json_trains_as_the_original():
    plan = _split_plan()
    again = Plan.from_json(plan.to_json())
    assert again == plan
    first, second = build("vgg_bn"), build("vgg_bn")
    a, b = _train(first, plan), _train(second, again)
    assert a.executor.offloaded_bytes == b.executor.offloaded_bytes
    assert a.executor.counters.unplanned_saves == b.executor.counters.unplanned_saves == 0
    for p, q in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(p, q)


def test_uninstall_gives_the_model_back_as_it_was():
    model = build("vgg_bn")
    modules = [name for name, _ in model.named_modules()]
    keys = list(model.state_dict())
    installed = _train(model, _split_plan(), steps=1)
    assert installed.splits is not None and not installed.active
    assert [name for name, _ in model.named_modules()] == modules
    assert list(model.state_dict()) == keys
    assert "forward" not in model.features.__dict__


def test_a_plan_for_another_model_is_refused_by_name():
    plan = _split_plan()
    with pytest.raises(ValueError, match=r"'features\[0:7\]'.*SmallResNet"):
        _train(build("resnet"), plan)
