"""Recomputing a run's cheap layers is bit-identical to plain PyTorch, BatchNorm included."""

import pytest
import torch
from torch import nn

from vmem.feedforward.recompute import cheap_forward


def _run(dropout: float, train: bool) -> nn.Sequential:
    torch.manual_seed(0)
    run = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                        nn.Dropout(dropout), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                        nn.BatchNorm2d(8, momentum=None), nn.ReLU(), nn.MaxPool2d(2))
    return run.train(train)


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


def test_under_bf16_autocast_it_is_bit_identical_to_plain():
    """Under autocast the layers run as they are (a bf16 input with fp32 weights)."""
    plain, twin = _run(0.0, True), _run(0.0, True)
    x = torch.randn(4, 3, 20, 20).bfloat16()
    results = []
    for layers, ours in ((plain, False), (twin, True)):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = cheap_forward(list(layers), xi) if ours else layers(xi)
        out.float().sum().backward()
        results.append([out, xi.grad, *(p.grad for p in layers.parameters()),
                        *layers.buffers()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
