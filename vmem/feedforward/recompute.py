"""Cheap-layer recomputation of a run (the memory-efficient DenseNet idea), bit-identical
to plain.

:func:`cheap_forward` recomputes only the cheap layers: in each BatchNorm → pointwise
layers → convolution stretch of a run, the activation the convolution reads (and its
pointwise layers keep) is not kept; backward renormalises it from the BatchNorm's input,
which is kept anyway, and runs the convolution's own backward on it
(``aten.convolution_backward``, what autograd calls), so no convolution runs twice and the
results are bit-identical. BatchNorm updates its running statistics once, in forward; the
recomputation normalises with the batch's statistics as forward did, without updating
them. Under autocast the convolution's backward would need the casts autograd records
around it, so there the layers simply run as they are (nothing is recomputed, and a
profile shows no saving). Whole blocks are recomputed by :mod:`.blocks`.

Example::

    >>> import torch
    >>> from torch import nn
    >>> run = [nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 8, 3, padding=1)]
    >>> x = torch.randn(2, 3, 16, 16, requires_grad=True)
    >>> out = cheap_forward(run, x)
    >>> out.sum().backward()
    >>> x.grad.shape
    torch.Size([2, 3, 16, 16])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .split import _POINTWISE, _tensors_of, needing_grad

__all__ = ["CheapRecompute", "cheap_forward", "cheap_stretches"]

def _autocast_state(device: torch.device) -> dict | None:
    """The autocast arguments forward ran under on ``device``'s type, or None (off)."""
    kind = device.type
    if kind not in ("cpu", "cuda") or not torch.is_autocast_enabled(kind):
        return None
    return {"device_type": kind, "dtype": torch.get_autocast_dtype(kind),
            "cache_enabled": torch.is_autocast_cache_enabled()}


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


class CheapRecompute(torch.autograd.Function):
    """``conv(pointwise(bn(x)))`` keeping only ``x``. Arguments: the input, the BatchNorm and
    pointwise layers, the convolution, then the parameters that need gradients (the
    BatchNorm's, then the convolution's)."""

    @staticmethod
    def forward(ctx, x, cheap, conv, *params):
        cheap = list(cheap)
        tensors, (own,) = _tensors_of(cheap), _tensors_of([conv])
        h = _run(cheap, tensors, x, update=True)
        out = F.conv2d(h, own["weight"], own.get("bias"), conv.stride, conv.padding,
                       conv.dilation, conv.groups)
        ctx.save_for_backward(x)
        ctx.cheap, ctx.tensors, ctx.conv, ctx.own, ctx.params = cheap, tensors, conv, own, params
        return out

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        conv, own = ctx.conv, ctx.own
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            h = _run(ctx.cheap, ctx.tensors, x, update=False)
        bias = own.get("bias")
        grad_h, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad, h.detach(), own["weight"], None if bias is None else list(bias.shape),
            list(conv.stride), list(conv.padding), list(conv.dilation), False, [0, 0],
            conv.groups, [True, own["weight"].requires_grad,
                          bias is not None and bias.requires_grad])
        conv_grads = {id(own["weight"]): grad_w}
        if bias is not None:
            conv_grads[id(bias)] = grad_b
        cheap_params = [p for p in ctx.params if id(p) not in conv_grads]
        got = torch.autograd.grad(h, [x, *cheap_params], grad_h, allow_unused=True)
        by_id = dict(zip((id(p) for p in cheap_params), got[1:], strict=True))
        by_id.update(conv_grads)
        grads = [by_id[id(p)] if by_id[id(p)] is not None else torch.zeros_like(p)
                 for p in ctx.params]
        return (got[0], None, None, *grads)


def cheap_stretches(layers) -> dict[int, int]:
    """``{first: conv}``: each BatchNorm → pointwise layers → Conv2d stretch of ``layers``."""
    layers, found, index = list(layers), {}, 0
    while index < len(layers):
        stop = index + 1
        if isinstance(layers[index], nn.BatchNorm2d):
            while stop < len(layers) and isinstance(layers[stop], _POINTWISE):
                stop += 1
            if stop < len(layers) and isinstance(layers[stop], nn.Conv2d):
                found[index] = stop
        index = stop
    return found


def cheap_forward(layers, x: torch.Tensor) -> torch.Tensor:
    """``layers`` applied in order, each BatchNorm → pointwise → Conv2d stretch through
    :class:`CheapRecompute`, the rest as they are (see the module docstring)."""
    layers, index = list(layers), 0
    stretches = {} if _autocast_state(x.device) else cheap_stretches(layers)
    while index < len(layers):
        if index in stretches:
            group, conv = layers[index:stretches[index]], layers[stretches[index]]
            x = CheapRecompute.apply(x, group, conv, *needing_grad([*group, conv]))
            index = stretches[index] + 1
            continue
        x = layers[index].forward(x)  # forward, not __call__: no module hooks inside a run
        index += 1
    return x
