"""Recomputing a run is bit-identical to plain PyTorch, dropout and BatchNorm included."""

import pytest
import torch
from torch import nn

from vmem.feedforward.recompute import cheap_forward, recompute_forward


def _run(dropout: float, train: bool) -> nn.Sequential:
    torch.manual_seed(0)
    run = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                        nn.Dropout(dropout), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                        nn.BatchNorm2d(8, momentum=None), nn.ReLU(), nn.MaxPool2d(2))
    return run.train(train)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_recompute_is_bit_identical_to_plain(dropout, train):
    plain, twin = _run(dropout, train), _run(dropout, train)
    x = torch.randn(4, 3, 20, 20)
    results = []
    for layers, recompute in ((plain, False), (twin, True)):
        torch.manual_seed(1)  # the same dropout masks in both
        xi = x.clone().requires_grad_()
        for _ in range(2):  # two steps: the running statistics move twice
            out = recompute_forward(list(layers), xi) if recompute else layers(xi)
            torch.manual_seed(2)  # backward must leave the generator as it found it
            out.backward(torch.ones_like(out))
        results.append([out, xi.grad, *(p.grad for p in layers.parameters()),
                        *layers.buffers(), torch.rand(3)])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_only_the_input_is_saved():
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        recompute_forward(list(_run(0.5, True)), x)
    assert len(saved) == 1 and saved[0] is x


@pytest.mark.parametrize("bias", [True, False])
def test_cheap_recompute_is_bit_identical_and_keeps_one_map_per_stretch(bias):
    def run():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=bias), nn.BatchNorm2d(8),
                             nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, padding=1, bias=bias),
                             nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1, bias=bias),
                             nn.MaxPool2d(2))

    plain, twin = run(), run()
    x = torch.randn(4, 3, 20, 20)
    results = []
    for layers, cheap in ((plain, False), (twin, True)):
        xi = x.clone().requires_grad_()
        for _ in range(2):
            out = cheap_forward(layers, xi) if cheap else layers(xi)
            out.backward(torch.ones_like(out))
        results.append([out, xi.grad, *(p.grad for p in layers.parameters()),
                        *layers.buffers()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    def kept(cheap: bool) -> int:
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                      lambda t: t):
            xi, layers = x.clone().requires_grad_(), run()
            cheap_forward(layers, xi) if cheap else layers(xi)
        return len({t.untyped_storage()._cdata for t in saved if t.shape[-1] >= 10})

    # Per BatchNorm-ReLU-conv stretch plain keeps the BatchNorm's input and the ReLU's
    # output; cheap keeps the first only.
    assert kept(cheap=True) == kept(cheap=False) - 2


@pytest.mark.parametrize("forward", [recompute_forward, cheap_forward])
def test_under_bf16_autocast_it_is_bit_identical_to_plain(forward):
    """The recomputation runs under forward's autocast state (a bf16 input with fp32
    weights and biases meets the convolution again in backward)."""
    plain, twin = _run(0.0, True), _run(0.0, True)
    x = torch.randn(4, 3, 20, 20).bfloat16()
    results = []
    for layers, ours in ((plain, False), (twin, True)):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = forward(list(layers), xi) if ours else layers(xi)
        out.float().sum().backward()
        results.append([out, xi.grad, *(p.grad for p in layers.parameters()),
                        *layers.buffers()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
