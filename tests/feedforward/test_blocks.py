"""Recomputed blocks (PyTorch's checkpoint through hooks) are bit-identical to plain PyTorch:
dropout, BatchNorm's running statistics, double backward, tensor hooks and autocast
included; installing and removing them changes nothing of the model."""

import copy

import pytest
import torch
from torch import nn

from vmem import models
from vmem.feedforward.blocks import Recomputation, resolve_unit


def _chain(dropout: float = 0.5) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                         nn.Dropout(dropout), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                         nn.BatchNorm2d(8, momentum=None), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(8 * 5 * 5, 3))


def _results(model, blocks, step, steps: int = 2):
    """``step(model)`` run ``steps`` times with ``blocks`` recomputed (None: plain), the
    generator reseeded alike; what it returns, the gradients, the buffers, and a draw
    after it (backward leaves the generator as plain leaves it)."""
    torch.manual_seed(1)
    outs = []
    with Recomputation(model, blocks) if blocks else _Nothing():
        for _ in range(steps):
            outs.append(step(model))
    return [*outs, *(p.grad for p in model.parameters()), *model.buffers(), torch.rand(3)]


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _assert_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def _train_step(x):
    def step(model):
        out = model(x)
        out.sum().backward()
        return out.detach()
    return step


@pytest.mark.parametrize("train", [True, False])
def test_a_stretch_of_a_top_level_sequential_is_bit_identical(train):
    x = torch.randn(4, 3, 20, 20)
    plain, twin = _chain().train(train), _chain().train(train)
    _assert_equal(_results(plain, None, _train_step(x)),
                  _results(twin, ["[0:8]"], _train_step(x)))
    assert int(twin[1].num_batches_tracked) == (2 if train else 0)


def test_only_the_input_is_saved_through_the_hooks_around_it():
    model, x = _chain(), torch.randn(2, 3, 20, 20, requires_grad=True)
    saved = []
    with Recomputation(model, ["[0:8]"]), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t) or t, lambda t: t):
        model(x)
    assert saved[0] is x  # then the Linear's input and weight, outside the stretch
    assert all(t.dim() <= 2 for t in saved[1:])


def test_residual_blocks_double_backward_hooks_and_autocast():
    torch.manual_seed(0)
    base = models.resnet20(10)
    blocks = [f"layer{i}.{j}" for i in (1, 2, 3) for j in range(3)]
    x = torch.randn(4, 3, 32, 32)

    def penalty(model):  # a gradient penalty: double backward through the blocks
        xi = x.clone().requires_grad_()
        out = model(xi).sum()
        (grad,) = torch.autograd.grad(out, xi, create_graph=True)
        (out + grad.pow(2).sum()).backward()
        return out.detach()

    def hooked(model):  # a parameter's tensor hook runs once: halves once
        handle = model.layer2[0].conv1.weight.register_hook(lambda g: g * 0.5)
        try:
            return _train_step(x)(model)
        finally:
            handle.remove()

    def bf16(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().sum().backward()
        return out.detach()

    for step in (_train_step(x), penalty, hooked, bf16):
        _assert_equal(_results(copy.deepcopy(base), None, step),
                      _results(copy.deepcopy(base), blocks, step))


def test_installing_and_removing_changes_nothing_of_the_model():
    model = models.resnet20(10)
    keys = list(model.state_dict())
    modules = [(n, type(m)) for n, m in model.named_modules()]
    hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]
    with Recomputation(model, ["layer1.0", "layer2"]):
        assert list(model.state_dict()) == keys
        assert "forward" not in model.layer1[0].__dict__
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()] == hooks


def test_a_forward_that_works_between_children_is_refused_not_recomputed_wrongly():
    class Iterating(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))

        def forward(self, x):
            for layer in self.body:
                x = layer(x) * 2  # not a chain: the body's own forward never runs
            return x

    model = Iterating()
    with Recomputation(model, ["body[0:3]"]), pytest.raises(RuntimeError, match="chain"):
        model(torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("name", ["layer9", "layer1[2:5]", "", "fc[0:1]"])
def test_a_name_that_is_no_block_is_refused_by_name(name):
    with pytest.raises(ValueError, match="not a block"):
        resolve_unit(models.resnet20(10), name)
