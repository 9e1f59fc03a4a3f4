"""Exact feature-map splitting (mmCNN's Self Part Number; Split-CNN made exact).

A chain of window layers (convolutions, max pooling) and pointwise layers (ReLU and the
like) is run part by part along the height or the width of its output: each part reads the
input rows its receptive field needs (the halo, from kernel size, stride, padding and
dilation), pads only where the real map ends, and computes exactly the rows of the full
result; backward recomputes each part and adds up the overlapping input gradients. Only one
part's working set is ever on the device, and only the chain's input is saved for backward
(so the offload executor can move it).

The arithmetic is the unsplit layers' own on a narrower map, so results agree with the
unsplit chain to float rounding (kernels may choose other algorithms for other sizes).
BatchNorm, whose training statistics span the whole map, is not split yet.

Example::

    >>> import torch
    >>> from torch import nn
    >>> chain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    >>> x = torch.randn(2, 3, 32, 32)
    >>> torch.allclose(split_forward(chain, x, parts=4, axis=2), chain(x), atol=1e-6)
    True
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SplitChain", "split_forward", "check_splittable"]

_POINTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
              nn.Hardswish, nn.Identity)


@dataclasses.dataclass(frozen=True)
class _Window:
    """One layer's geometry along the split axis."""

    kernel: int = 1
    stride: int = 1
    padding: int = 0
    dilation: int = 1

    def needs(self, start: int, stop: int) -> tuple[int, int]:
        """Input rows (before padding; may pass the map's ends) for output rows [start, stop)."""
        first = start * self.stride - self.padding
        span = self.dilation * (self.kernel - 1) + 1
        return first, (stop - 1) * self.stride - self.padding + span

    def out_size(self, size: int) -> int:
        span = self.dilation * (self.kernel - 1) + 1
        return (size + 2 * self.padding - span) // self.stride + 1


def _pair(value, axis: int) -> int:
    value = value if isinstance(value, (tuple, list)) else (value, value)
    return int(value[axis - 2])


def _window(layer: nn.Module, axis: int) -> _Window:
    if isinstance(layer, nn.Conv2d):
        if isinstance(layer.padding, str):
            raise ValueError(f"{layer}: give the padding as numbers to split it")
        return _Window(_pair(layer.kernel_size, axis), _pair(layer.stride, axis),
                       _pair(layer.padding, axis), _pair(layer.dilation, axis))
    if isinstance(layer, nn.MaxPool2d):
        if layer.ceil_mode:
            raise ValueError(f"{layer}: ceil_mode pooling is not split")
        stride = layer.stride if layer.stride is not None else layer.kernel_size
        return _Window(_pair(layer.kernel_size, axis), _pair(stride, axis),
                       _pair(layer.padding, axis), _pair(layer.dilation, axis))
    if isinstance(layer, _POINTWISE):
        return _Window()
    raise ValueError(f"{type(layer).__name__} cannot be split exactly (only Conv2d, MaxPool2d "
                     "and pointwise layers, for now)")


def check_splittable(chain: nn.Sequential, axis: int) -> list[_Window]:
    """Each layer's geometry along ``axis`` (2: height, 3: width); ValueError if any layer
    cannot be split exactly."""
    if axis not in (2, 3):
        raise ValueError(f"axis={axis}: split along 2 (height) or 3 (width)")
    return [_window(layer, axis) for layer in chain]


def _apply(layer: nn.Module, x: torch.Tensor, pads: tuple[int, int], axis: int) -> torch.Tensor:
    """``layer`` on rows that already carry their halo: pad where the map really ends, with
    the layer's own padding value, and none along the axis inside the layer."""
    if isinstance(layer, _POINTWISE):
        return layer(x)
    before, after = pads
    if before or after:
        spec = (0, 0, before, after) if axis == 2 else (before, after, 0, 0)
        fill = 0.0 if isinstance(layer, nn.Conv2d) else float("-inf")
        x = F.pad(x, spec, value=fill)
    if isinstance(layer, nn.Conv2d):
        padding = list(layer.padding)
        padding[axis - 2] = 0
        return F.conv2d(x, layer.weight, layer.bias, layer.stride, padding, layer.dilation,
                        layer.groups)
    padding = list((layer.padding,) * 2 if isinstance(layer.padding, int) else layer.padding)
    padding[axis - 2] = 0
    return F.max_pool2d(x, layer.kernel_size, layer.stride, padding, layer.dilation)


def _plan_part(windows: list[_Window], sizes: list[int], start: int, stop: int):
    """For output rows [start, stop): the input rows to read, and per layer its pads."""
    pads = []
    for window, size in zip(reversed(windows), reversed(sizes[:-1]), strict=True):
        first, last = window.needs(start, stop)
        start, stop = max(first, 0), min(last, size)
        pads.append((start - first, last - stop))
    return (start, stop), list(reversed(pads))


def _parts(size: int, parts: int) -> list[tuple[int, int]]:
    bounds = [size * i // parts for i in range(parts + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def _run_part(chain, x, rows, pads, axis):
    part = x.narrow(axis, rows[0], rows[1] - rows[0])
    for layer, pad in zip(chain, pads, strict=True):
        part = _apply(layer, part, pad, axis)
    return part


class SplitChain(torch.autograd.Function):
    """Forward in parts without autograd; backward recomputes each part and accumulates."""

    @staticmethod
    def forward(ctx, x, chain, parts, axis, *params):
        windows = check_splittable(chain, axis)
        sizes = [x.shape[axis]]
        for window in windows:
            sizes.append(window.out_size(sizes[-1]))
        outputs = []
        for start, stop in _parts(sizes[-1], parts):
            rows, pads = _plan_part(windows, sizes, start, stop)
            outputs.append(_run_part(chain, x, rows, pads, axis))
        ctx.save_for_backward(x)
        ctx.chain, ctx.parts, ctx.axis, ctx.windows, ctx.sizes = chain, parts, axis, windows, \
            sizes
        return torch.cat(outputs, axis)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        params = [p for p in ctx.chain.parameters()]
        grad_x = torch.zeros_like(x)
        grad_params = [torch.zeros_like(p) for p in params]
        for start, stop in _parts(ctx.sizes[-1], ctx.parts):
            rows, pads = _plan_part(ctx.windows, ctx.sizes, start, stop)
            with torch.enable_grad():
                part_in = x.narrow(ctx.axis, rows[0], rows[1] - rows[0]).detach()
                part_in.requires_grad_(True)
                out = _run_part(ctx.chain, part_in, (0, rows[1] - rows[0]), pads, ctx.axis)
                got = torch.autograd.grad(out, [part_in, *params],
                                          grad.narrow(ctx.axis, start, stop - start),
                                          allow_unused=True)
            grad_x.narrow(ctx.axis, rows[0], rows[1] - rows[0]).add_(got[0])
            for total, g in zip(grad_params, got[1:], strict=True):
                if g is not None:
                    total.add_(g)
        return (grad_x, None, None, None, *grad_params)


def split_forward(chain: nn.Sequential, x: torch.Tensor, parts: int, axis: int = 2):
    """``chain(x)`` computed in ``parts`` parts along ``axis`` (2: height, 3: width)."""
    if parts < 1:
        raise ValueError(f"parts={parts} must be at least 1")
    return SplitChain.apply(x, chain, parts, axis, *chain.parameters())
