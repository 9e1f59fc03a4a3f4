"""Recomputation (Chen et al.'s checkpointing) of a run of layers, bit-identical to plain.

Forward runs the layers without autograd and keeps only the run's input (on the device, or
in the host pool through a stash, :mod:`.stream`); backward runs them again, with autograd,
from that input and the random-number state forward started from, then backpropagates. The
operations are the layers' own on the same inputs, so the output and every gradient equal
plain PyTorch's bit for bit, dropout masks included (the recomputation replays the same
random numbers and leaves the generators as it found them). BatchNorm updates its running
statistics once, in forward; the recomputation normalises with the batch's statistics as
forward did, without updating them.

Example::

    >>> import torch
    >>> from torch import nn
    >>> run = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5)]
    >>> x = torch.randn(2, 3, 16, 16, requires_grad=True)
    >>> out = recompute_forward(run, x)
    >>> out.sum().backward()
    >>> x.grad.shape
    torch.Size([2, 3, 16, 16])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .split import Held, _tensors_of

__all__ = ["RecomputeChain", "recompute_forward"]

_DEVICE_RNG = ("cuda",)  # device types whose generator the recomputation must replay too


def _rng_state(device: torch.device):
    cpu = torch.get_rng_state()
    if device.type in _DEVICE_RNG:
        return cpu, torch.cuda.get_rng_state(device)
    return cpu, None


def _batch_norm(layer: nn.BatchNorm2d, tensors: dict, x: torch.Tensor,
                update: bool) -> torch.Tensor:
    """``layer(x)`` as ``nn.BatchNorm2d.forward`` computes it; the running statistics are
    updated only when ``update``."""
    training = layer.training or not layer.track_running_stats
    factor = 0.0 if layer.momentum is None else layer.momentum
    if layer.training and layer.track_running_stats and update:
        tracked = tensors["num_batches_tracked"]
        tracked.add_(1)
        factor = 1.0 / float(tracked) if layer.momentum is None else layer.momentum
    keep_running = not training or update
    return F.batch_norm(x, tensors.get("running_mean") if keep_running else None,
                        tensors.get("running_var") if keep_running else None,
                        tensors.get("weight"), tensors.get("bias"), training, factor,
                        layer.eps)


def _run(layers, tensors, x: torch.Tensor, update: bool) -> torch.Tensor:
    for layer, own in zip(layers, tensors, strict=True):
        if isinstance(layer, nn.BatchNorm2d):
            x = _batch_norm(layer, own, x, update)
        elif isinstance(layer, nn.Conv2d):
            x = F.conv2d(x, own["weight"], own.get("bias"), layer.stride, layer.padding,
                         layer.dilation, layer.groups)
        else:  # pooling, pointwise, dropout: no parameters; forward skips module hooks
            x = layer.forward(x)
    return x


class RecomputeChain(torch.autograd.Function):
    """Arguments: the input, the layers, a stash (None: autograd saves the input), then the
    parameters that need gradients."""

    @staticmethod
    def forward(ctx, x, layers, stash, *params):
        layers = list(layers)
        tensors = _tensors_of(layers)
        ctx.rng = _rng_state(x.device)
        out = _run(layers, tensors, x, update=True)
        if stash is None:
            ctx.save_for_backward(x)
            ctx.source = None
        else:
            ctx.source = stash(x)
        ctx.layers, ctx.tensors, ctx.params, ctx.shape = layers, tensors, params, x.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        source = ctx.source if ctx.source is not None else Held(ctx.saved_tensors[0])
        x = source.rows(0, 0, ctx.shape[0]).detach().requires_grad_(True)
        cpu, device_state = ctx.rng
        devices = [x.device] if device_state is not None else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.set_rng_state(cpu)
            if device_state is not None:
                torch.cuda.set_rng_state(device_state, x.device)
            out = _run(ctx.layers, ctx.tensors, x, update=False)
        got = torch.autograd.grad(out, [x, *ctx.params], grad, allow_unused=True)
        grads = [g if g is not None else torch.zeros_like(p)
                 for g, p in zip(got, [x, *ctx.params], strict=True)]
        return (grads[0], None, None, *grads[1:])


def recompute_forward(layers, x: torch.Tensor, *, stash=None) -> torch.Tensor:
    """``layers`` applied to ``x`` in order, recomputed in backward (see the module
    docstring): Conv2d, BatchNorm2d, MaxPool2d, pointwise layers and dropout."""
    params = [p for layer in layers for p in layer.parameters(recurse=False) if p.requires_grad]
    return RecomputeChain.apply(x, layers, stash, *params)
