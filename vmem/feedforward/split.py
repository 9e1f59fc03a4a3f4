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

BatchNorm in training mode normalises with statistics of the whole map, so it costs passes:
forward, one pass per BatchNorm accumulates its input's sums over the parts (later parts
normalise with them), then the output pass; the running statistics get the unsplit update.
Backward, BatchNorm's input gradient is gamma*r*g (the direct term, which autograd gives part
by part) plus a correction -gamma*r*(S1 + (x-mu)*r^2*S2)/n, with S1 = sum(g) and
S2 = sum(g*(x-mu)) over the whole map. Both sums are linear in g, so they add up exactly over
parts whose halo rows overlap; they are gathered per BatchNorm from the last to the first
(a later one's correction flows into an earlier one's g). The correction, which does not
depend on g, is added once per row: over a partition of the BatchNorm's own input map.

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
    if isinstance(layer, (*_POINTWISE, nn.BatchNorm2d)):
        return _Window()
    raise ValueError(f"{type(layer).__name__} cannot be split exactly (only Conv2d, MaxPool2d, "
                     "BatchNorm2d and pointwise layers)")


def check_splittable(chain: nn.Sequential, axis: int) -> list[_Window]:
    """Each layer's geometry along ``axis`` (2: height, 3: width); ValueError if any layer
    cannot be split exactly."""
    if axis not in (2, 3):
        raise ValueError(f"axis={axis}: split along 2 (height) or 3 (width)")
    return [_window(layer, axis) for layer in chain]


def _apply(layer: nn.Module, x: torch.Tensor, pads: tuple[int, int], axis: int) -> torch.Tensor:
    """``layer`` on rows that already carry their halo: pad where the map really ends, with
    the layer's own padding value, and none along the axis inside the layer."""
    if isinstance(layer, (*_POINTWISE, nn.BatchNorm2d)):  # BatchNorm here: running statistics
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


def _batch_statistics(layer: nn.Module) -> bool:
    """A BatchNorm that normalises with the batch's own statistics (not running ones)."""
    return isinstance(layer, nn.BatchNorm2d) and (layer.training or
                                                   not layer.track_running_stats)


def _normalise(layer: nn.BatchNorm2d, h: torch.Tensor, stats) -> torch.Tensor:
    """BatchNorm with the whole map's statistics, which are constants here."""
    mean, invstd = stats
    h = (h - mean[None, :, None, None]) * invstd[None, :, None, None]
    if layer.weight is not None:
        h = h * layer.weight[None, :, None, None] + layer.bias[None, :, None, None]
    return h


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


def _run_part(chain, x, rows, pads, axis, stats, capture=None):
    """The chain on input rows ``rows`` of ``x``; ``capture`` collects each batch-statistics
    BatchNorm's (input, output) by layer index."""
    part = x.narrow(axis, rows[0], rows[1] - rows[0])
    for index, (layer, pad) in enumerate(zip(chain, pads, strict=True)):
        if _batch_statistics(layer):
            out = _normalise(layer, part, stats[index])
            if capture is not None:  # an in-place layer next must not change what we hold
                capture[index] = (part, out)
                out = out.clone()
            part = out
        else:
            part = _apply(layer, part, pad, axis)
    return part


class _Geometry:
    """The chain's windows and map sizes along the axis, and how to cut any prefix of it."""

    def __init__(self, chain: nn.Sequential, size: int, parts: int, axis: int) -> None:
        self.windows = check_splittable(chain, axis)
        self.sizes = [size]
        for window in self.windows:
            self.sizes.append(window.out_size(self.sizes[-1]))
        self.parts, self.axis = parts, axis

    def cuts(self, end: int):
        """(input rows, pads) of each part of layer ``end - 1``'s output (the whole chain's
        when ``end`` is its length): parts that partition that map."""
        for start, stop in _parts(self.sizes[end], self.parts):
            yield _plan_part(self.windows[:end], self.sizes[:end + 1], start, stop), start, stop


def _channel_sums(t: torch.Tensor) -> torch.Tensor:
    return t.double().sum((0, 2, 3))


def _update_running(layer: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, n: int):
    """The running-statistics update of an unsplit training-mode BatchNorm."""
    if not (layer.training and layer.track_running_stats):
        return
    layer.num_batches_tracked.add_(1)
    factor = 1.0 / float(layer.num_batches_tracked) if layer.momentum is None else \
        layer.momentum
    layer.running_mean.mul_(1 - factor).add_(mean.to(layer.running_mean.dtype), alpha=factor)
    unbiased = var * n / max(n - 1, 1)
    layer.running_var.mul_(1 - factor).add_(unbiased.to(layer.running_var.dtype), alpha=factor)


class SplitChain(torch.autograd.Function):
    """Forward in parts without autograd; backward recomputes each part and accumulates."""

    @staticmethod
    def forward(ctx, x, chain, parts, axis, *params):
        geometry = _Geometry(chain, x.shape[axis], parts, axis)
        stats, counts = {}, {}
        for index, layer in enumerate(chain):  # each BatchNorm's statistics, in order
            if not _batch_statistics(layer):
                continue
            total = square = 0
            for (rows, pads), _, _ in geometry.cuts(index):
                h = _run_part(chain[:index], x, rows, pads, axis, stats)
                total, square = total + _channel_sums(h), square + _channel_sums(h * h)
            n = x.shape[0] * h.shape[5 - axis] * geometry.sizes[index]
            mean = total / n
            var = (square / n - mean * mean).clamp_min(0)
            stats[index] = (mean.to(x.dtype), (var + layer.eps).rsqrt().to(x.dtype))
            counts[index] = n
            _update_running(layer, mean, var, n)
        outputs = [_run_part(chain, x, rows, pads, axis, stats)
                   for (rows, pads), _, _ in geometry.cuts(len(chain))]
        ctx.save_for_backward(x)
        ctx.chain, ctx.geometry, ctx.stats, ctx.counts = chain, geometry, stats, counts
        return torch.cat(outputs, axis)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        chain, geometry, stats = ctx.chain, ctx.geometry, ctx.stats
        params = list(chain.parameters())
        backward = _Backward(chain, geometry, stats, ctx.counts, x, grad)
        for index in sorted(stats, reverse=True):  # each BatchNorm's sums, last first
            backward.gather_sums(index)
        grad_x = torch.zeros_like(x)
        grad_params = [torch.zeros_like(p) for p in params]
        for rows, g_in, g_params in backward.final_passes(params):
            grad_x.narrow(geometry.axis, rows[0], rows[1] - rows[0]).add_(g_in)
            for total, g in zip(grad_params, g_params, strict=True):
                if g is not None:
                    total.add_(g)
        return (grad_x, None, None, None, *grad_params)


class _Backward:
    """The passes of SplitChain's backward (see the module docstring)."""

    def __init__(self, chain, geometry, stats, counts, x, grad) -> None:
        self.chain, self.geometry, self.stats, self.counts = chain, geometry, stats, counts
        self.x, self.grad, self.axis = x, grad, geometry.axis
        self.sums: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # S1, S2 per BatchNorm

    def _recompute(self, end: int, rows, pads):
        part_in = self.x.narrow(self.axis, rows[0], rows[1] - rows[0]).detach()
        part_in.requires_grad_(True)
        capture: dict = {}
        out = _run_part(self.chain[:end], part_in, (0, rows[1] - rows[0]), pads, self.axis,
                        self.stats, capture)
        return part_in, out, capture

    def _correction(self, index: int, u: torch.Tensor) -> torch.Tensor:
        """The part of BatchNorm ``index``'s input gradient that does not depend on g."""
        layer, (mean, invstd) = self.chain[index], self.stats[index]
        s1, s2 = self.sums[index]
        n = self.counts[index]
        scale = invstd if layer.weight is None else invstd * layer.weight.detach()
        c = s1.to(u.dtype)[None, :, None, None] / n + \
            (u - mean[None, :, None, None]) * (invstd * invstd * s2.to(u.dtype) / n)[
                None, :, None, None]
        return -scale[None, :, None, None] * c

    def _sources(self, later: list[int]):
        """Every gradient that flows down the chain: the output's, part by part, and each
        later BatchNorm's correction over a partition of its input map. Yields the part's
        input, its output (where the gradient enters), that gradient and the captures."""
        with torch.enable_grad():
            for (rows, pads), start, stop in self.geometry.cuts(len(self.chain)):
                part_in, out, capture = self._recompute(len(self.chain), rows, pads)
                yield rows, part_in, out, self.grad.narrow(self.axis, start, stop - start), \
                    capture
            for index in later:
                for (rows, pads), _, _ in self.geometry.cuts(index):
                    part_in, u, capture = self._recompute(index, rows, pads)
                    yield rows, part_in, u, self._correction(index, u.detach()), capture

    def gather_sums(self, index: int) -> None:
        mean = self.stats[index][0].double()[None, :, None, None]
        s1 = s2 = 0
        for _, _, out, g_out, capture in self._sources([k for k in self.sums if k > index]):
            u, z = capture[index]
            (g,) = torch.autograd.grad(out, z, g_out)
            s1 = s1 + _channel_sums(g)
            s2 = s2 + (g.double() * (u.detach().double() - mean)).sum((0, 2, 3))
        self.sums[index] = (s1, s2)

    def final_passes(self, params):
        for rows, part_in, out, g_out, _ in self._sources(sorted(self.sums)):
            with torch.enable_grad():
                got = torch.autograd.grad(out, [part_in, *params], g_out, allow_unused=True)
            g_in = got[0] if got[0] is not None else torch.zeros_like(part_in)
            yield rows, g_in, got[1:]


def split_forward(chain: nn.Sequential, x: torch.Tensor, parts: int, axis: int = 2):
    """``chain(x)`` computed in ``parts`` parts along ``axis`` (2: height, 3: width)."""
    if parts < 1:
        raise ValueError(f"parts={parts} must be at least 1")
    return SplitChain.apply(x, chain, parts, axis, *chain.parameters())
