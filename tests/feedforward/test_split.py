"""Exact splitting: random convolution chains, every part count, both axes, against unsplit."""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from vmem.feedforward.split import check_splittable, split_forward


def _chain(draw) -> nn.Sequential:
    layers, channels = [], 3
    for _ in range(draw(st.integers(1, 3))):
        kernel = draw(st.sampled_from([1, 3, 5, 7]))
        dilation = draw(st.sampled_from([1, 2]))
        same = draw(st.booleans())
        padding = dilation * (kernel - 1) // 2 if same else 0
        out = draw(st.sampled_from([4, 8]))
        layers.append(nn.Conv2d(channels, out, kernel, stride=draw(st.sampled_from([1, 2])),
                                padding=padding, dilation=dilation))
        layers.append(nn.ReLU())
        if draw(st.booleans()):
            layers.append(nn.MaxPool2d(draw(st.sampled_from([2, 3])), stride=2,
                                       padding=draw(st.sampled_from([0, 1]))))
        channels = out
    return nn.Sequential(*layers)


@st.composite
def cases(draw):
    torch.manual_seed(draw(st.integers(0, 2**16)))
    return (_chain(draw), draw(st.integers(2, 8)), draw(st.sampled_from([2, 3])),
            draw(st.integers(40, 72)), draw(st.integers(40, 72)))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@settings(max_examples=60, deadline=None)
@given(cases())
def test_split_equals_unsplit(case):
    chain, parts, axis, height, width = case
    x = torch.randn(2, 3, height, width)
    try:
        chain(x)
    except RuntimeError:  # the chain shrinks this map to nothing: not a case
        assume(False)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    full = chain(x1)
    grad = torch.randn_like(full)
    full.backward(grad)
    want = [x1.grad] + [p.grad.clone() for p in chain.parameters()]
    chain.zero_grad()
    split = split_forward(chain, x2, parts, axis)
    assert split.shape == full.shape
    assert _relative(split, full) <= 1e-6
    split.backward(grad)
    got = [x2.grad] + [p.grad for p in chain.parameters()]
    for w, g in zip(want, got, strict=True):
        assert _relative(g, w) <= 1e-5


def test_unsplittable_layers_say_so():
    with pytest.raises(ValueError, match="BatchNorm2d cannot be split"):
        check_splittable(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), 2)
    with pytest.raises(ValueError, match="axis=1"):
        check_splittable(nn.Sequential(nn.ReLU()), 1)
    with pytest.raises(ValueError, match="parts=0"):
        split_forward(nn.Sequential(nn.ReLU()), torch.randn(1, 1, 4, 4), 0)


def test_only_the_input_is_saved_for_backward():
    chain = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3,
                                                                              padding=1))
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        split_forward(chain, x, parts=4)
    assert len(saved) == 1 and saved[0] is x
