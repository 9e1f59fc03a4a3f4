"""Exact splitting: random convolution chains, every part count, both axes, against unsplit."""

import copy

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
        if draw(st.booleans()):
            layers.append(nn.BatchNorm2d(out))
        layers.append(nn.ReLU(inplace=draw(st.booleans())))
        if draw(st.booleans()):
            layers.append(nn.MaxPool2d(draw(st.sampled_from([2, 3])), stride=2,
                                       padding=draw(st.sampled_from([0, 1]))))
        channels = out
    return nn.Sequential(*layers)


@st.composite
def cases(draw):
    torch.manual_seed(draw(st.integers(0, 2**16)))
    return (_chain(draw), draw(st.integers(2, 8)), draw(st.sampled_from([0, 2, 3])),
            draw(st.integers(2, 6)), draw(st.integers(40, 72)), draw(st.integers(40, 72)))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().flatten() for t in tensors])


@settings(max_examples=60, deadline=None)
@given(cases())
def test_split_equals_unsplit(case):
    """Against unsplit fp32: forward within 1e-6, gradients within 1e-5, relative. Where the
    unsplit fp32 result is itself that far from the true (float64) one -- BatchNorm after
    layers whose mean dwarfs their spread cancels digits -- both are held to the float64
    result instead, the split within three times the unsplit's own error."""
    chain, parts, axis, batch, height, width = case
    x = torch.randn(batch, 3, height, width)
    try:
        copy.deepcopy(chain)(x)
    except (RuntimeError, ValueError):  # the chain shrinks this map to nothing: not a case
        assume(False)
    twin, exact = copy.deepcopy(chain), copy.deepcopy(chain).double()
    x1, x2, x3 = (x.clone().requires_grad_(), x.clone().requires_grad_(),
                  x.double().requires_grad_())
    full = chain(x1)
    grad = torch.randn_like(full)
    full.backward(grad)
    true = exact(x3)
    true.backward(grad.double())
    split = split_forward(twin, x2, parts, axis)
    assert split.shape == full.shape
    split.backward(grad)
    # All parameter gradients as one vector: a convolution bias just before BatchNorm has a
    # true gradient of zero, of which both runs hold only rounding noise.
    results = [(split, full, true, 1e-6), (x2.grad, x1.grad, x3.grad, 1e-5),
               (_flat(p.grad for p in twin.parameters()),
                _flat(p.grad for p in chain.parameters()),
                _flat(p.grad for p in exact.parameters()), 1e-5)]
    for mine, unsplit, truth, tolerance in results:
        assert _relative(mine, unsplit) <= tolerance or \
            _relative(mine, truth) <= 3 * _relative(unsplit, truth)
    for mine, theirs in zip(twin.buffers(), chain.buffers(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)  # running statistics


def test_unsplittable_layers_say_so():
    with pytest.raises(ValueError, match="AvgPool2d cannot be split"):
        check_splittable(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AvgPool2d(2)), 2)
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


def test_batchnorm_in_eval_mode_is_pointwise():
    chain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval()
    x = torch.randn(2, 3, 40, 40)
    torch.testing.assert_close(split_forward(chain, x, parts=5), chain(x), rtol=1e-6,
                               atol=1e-6)


def test_batch_axis_on_one_sample_per_part():
    chain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    twin = copy.deepcopy(chain)
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(split_forward(twin, x, parts=4, axis=0), chain(x), rtol=1e-6,
                               atol=1e-6)
    for mine, theirs in zip(twin.buffers(), chain.buffers(), strict=True):
        torch.testing.assert_close(mine, theirs)


def _patches_chain() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1))


def test_approximate_mode_is_split_cnn_and_differs_from_exact():
    """Split-CNN's patches are separate images: equal to the chain on each patch, and not to
    the chain on the whole map (so nobody mistakes the approximate mode for the exact one)."""
    chain = _patches_chain()
    x = torch.randn(2, 3, 32, 32)
    approximate = split_forward(chain, x, parts=4, axis=2, approximate=True)
    patches = torch.cat([chain(patch) for patch in x.split(8, dim=2)], dim=2)
    torch.testing.assert_close(approximate, patches, rtol=1e-6, atol=1e-6)
    exact = split_forward(chain, x, parts=4, axis=2)
    torch.testing.assert_close(exact, chain(x), rtol=1e-6, atol=1e-6)
    border = (approximate - exact).abs().amax(dim=(0, 1, 3))  # per output row
    assert border[3] > 1e-2 and border[4] > 1e-2  # the rows either side of a patch border
    torch.testing.assert_close(approximate[:, :, :2], exact[:, :, :2])  # beyond any border


def test_approximate_mode_takes_the_most_patches_that_divide_the_map():
    chain, x = _patches_chain(), torch.randn(1, 3, 18, 18)  # 4 patches would pool 8 rows of 9
    three = torch.cat([chain(patch) for patch in x.split(6, dim=2)], dim=2)
    torch.testing.assert_close(split_forward(chain, x, parts=4, approximate=True), three)
