"""The per-layer timer of real steps: one time per timed leaf layer, spans that fit the step."""

import time

import torch
from nets import SHAPE, build

from vmem.feedforward.split_runs import Splits, find_runs
from vmem.preprocessing import profile_network
from vmem.preprocessing.timing import LayerTimer


def _leaf_layers(model) -> list[str]:
    """What the session hands the timer: the profile's names of leaf-module layers."""
    profile = profile_network(model, SHAPE)
    return [layer.name for layer in profile.layers if layer.module]


def _steps(model, timer, steps=2):
    """Train ``steps`` steps under ``timer``; the wall time of each forward and backward."""
    walls = []
    for _ in range(steps):
        x = torch.randn(SHAPE)
        timer.start_step()
        start = time.perf_counter()
        out = model(x)
        timer.end_forward()
        middle = time.perf_counter()
        out.sum().backward()
        walls.append(((middle - start) * 1e3, (time.perf_counter() - middle) * 1e3))
    timer.stop()
    return walls


def _hooked(model) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_one_positive_time_per_leaf_layer_and_spans_within_the_step():
    model = build("resnet")
    layers = _leaf_layers(model)
    assert "layer1.0.relu#1" in layers  # a module called twice is two layers
    timer = LayerTimer(model, layers, torch.device("cpu"))
    walls = _steps(model, timer)
    assert not _hooked(model)
    steps = timer.finished()
    assert len(steps) == 2
    for step, (forward_wall, backward_wall) in zip(steps, walls, strict=True):
        assert sorted(step) == sorted(layers)  # the residual adds are no leaf modules
        assert all(fwd > 0 and bwd > 0 for fwd, bwd in step.values())
        assert sum(fwd for fwd, _ in step.values()) <= forward_wall
        assert sum(bwd for _, bwd in step.values()) <= backward_wall
    median = timer.median(skip=1)
    assert median == steps[1]  # one step left: its own times


def test_only_steps_with_a_finished_backward_count():
    model = build("vgg_bn")
    timer = LayerTimer(model, _leaf_layers(model), torch.device("cpu"))
    timer.start_step()
    model(torch.randn(SHAPE))  # a forward without backward
    with torch.no_grad():
        model(torch.randn(SHAPE))  # and an evaluation
    _steps(model, timer, steps=1)
    assert len(timer.finished()) == 1
    with torch.no_grad():  # after stop: no hooks, nothing recorded
        model(torch.randn(SHAPE))
    assert len(timer.finished()) == 1 and not _hooked(model)


def test_calls_after_the_forward_are_not_the_steps():
    model = build("vgg_bn")
    timer = LayerTimer(model, _leaf_layers(model), torch.device("cpu"))
    timer.start_step()
    out = model(torch.randn(SHAPE))
    timer.end_forward()
    model.classifier(torch.randn(2, 32 * 8 * 8))  # e.g. a metric computed with the model
    out.sum().backward()
    timer.stop()
    (step,) = timer.finished()
    assert "classifier#1" not in step and step["classifier"][0] > 0


def test_a_split_run_is_timed_as_one_layer():
    model = build("vgg_bn")
    runs = {run: (2, 0) for run in find_runs(model)}
    with Splits(model, runs):
        layers = _leaf_layers(model)
        timer = LayerTimer(model, layers, torch.device("cpu"))
        _steps(model, timer, steps=1)
    (step,) = timer.finished()
    assert sorted(step) == sorted(layers)
    assert {name for name in step if "vmem_split" in name} == {r.module_name for r in runs}
    assert all(fwd > 0 and bwd > 0 for fwd, bwd in step.values())
