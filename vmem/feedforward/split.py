"""Exact feature-map splitting (mmCNN's Self Part Number; Split-CNN made exact).

A chain of window layers (convolutions, max pooling) and pointwise layers (ReLU and the
like) is run part by part along the height or the width of its output: each part reads the
input rows its receptive field needs (the halo, from kernel size, stride, padding and
dilation), pads only where the real map ends, and computes exactly the rows of the full
result; backward recomputes each part and adds up the overlapping input gradients. Only one
part's working set is ever on the device, and only the chain's input is saved for backward
(so the offload executor can move it).

The arithmetic is the unsplit layers' own on a narrower map, so results agree with the
unsplit chain to float rounding (kernels may choose other algorithms for other sizes). The
batch is a third axis: no halo at all, and exact too, BatchNorm included (below). Backward
uses the parameter and buffer tensors the forward saw, so a chain run under
``torch.func.functional_call`` (as the profiler runs the model, on ``meta``) recomputes
with those.

Split-CNN's approximate mode (``approximate=True``) instead cuts the input into patches and
runs each as an image of its own, padded at its borders as the map is at its ends: no halo
and no shared rows, but the rows near a border see zeros where the neighbour's pixels were,
so **the model computes a different function**. It takes the most patches, up to ``parts``,
whose outputs add up to every layer's whole map. vmem never chooses it by itself.

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

__all__ = ["SplitChain", "split_forward", "check_splittable", "Held", "HEIGHT", "WIDTH",
           "BATCH"]

BATCH, HEIGHT, WIDTH = 0, 2, 3  # the axes a chain can be split along

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
        if layer.padding_mode != "zeros":
            raise ValueError(f"{layer}: only zero padding is split")
        if axis == BATCH:
            return _Window()
        return _Window(_pair(layer.kernel_size, axis), _pair(layer.stride, axis),
                       _pair(layer.padding, axis), _pair(layer.dilation, axis))
    if isinstance(layer, nn.MaxPool2d):
        if layer.ceil_mode or layer.return_indices:
            raise ValueError(f"{layer}: ceil_mode or return_indices pooling is not split")
        if axis == BATCH:
            return _Window()
        stride = layer.stride if layer.stride is not None else layer.kernel_size
        return _Window(_pair(layer.kernel_size, axis), _pair(stride, axis),
                       _pair(layer.padding, axis), _pair(layer.dilation, axis))
    if isinstance(layer, (*_POINTWISE, nn.BatchNorm2d)):
        return _Window()
    raise ValueError(f"{type(layer).__name__} cannot be split exactly (only Conv2d, MaxPool2d, "
                     "BatchNorm2d and pointwise layers)")


def check_splittable(chain, axis: int) -> list[_Window]:
    """Each layer's geometry along ``axis`` (0: batch, 2: height, 3: width); ValueError if a
    layer cannot be split."""
    if axis not in (BATCH, HEIGHT, WIDTH):
        raise ValueError(f"axis={axis}: split along 0 (batch), 2 (height) or 3 (width)")
    return [_window(layer, axis) for layer in chain]


class Held:
    """A split run's input kept on the device for backward; see :mod:`.stream` for the
    stashes that move it to the host instead. Backward reads it part by part."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def rows(self, axis: int, start: int, stop: int) -> torch.Tensor:
        return self.x.narrow(axis, start, stop - start)


def _check_first(chain) -> None:
    """The chain's input is the caller's tensor: its first layer must not write into it."""
    first = next(iter(chain), None)
    if getattr(first, "inplace", False):
        raise ValueError(f"{first} is in place and first in the chain: it would change the "
                         "caller's tensor, which backward reads again; start the chain after "
                         "it or make it out of place")


def needing_grad(chain) -> list[torch.Tensor]:
    """The chain's parameters that need gradients: what a Function over it is applied to."""
    return [p for layer in chain for p in layer.parameters(recurse=False) if p.requires_grad]


def _tensors_of(chain) -> list[dict[str, torch.Tensor]]:
    """Each layer's parameters and buffers as they are now (``functional_call`` may have
    swapped them); backward uses these, not whatever the modules hold by then."""
    return [{**dict(layer.named_parameters(recurse=False)),
             **dict(layer.named_buffers(recurse=False))} for layer in chain]


def _apply(layer: nn.Module, tensors: dict, x: torch.Tensor, pads: tuple[int, int],
           axis: int) -> torch.Tensor:
    """``layer`` on rows that already carry their halo: pad where the map really ends, with
    the layer's own padding value, and none along the axis inside the layer."""
    if isinstance(layer, _POINTWISE):
        return layer.forward(x)  # forward, not __call__: no module hooks inside a split run
    if isinstance(layer, nn.BatchNorm2d):  # normalising with running statistics: pointwise
        return F.batch_norm(x, tensors["running_mean"], tensors["running_var"],
                            tensors.get("weight"), tensors.get("bias"), False, 0.0, layer.eps)
    padding = [_pair(layer.padding, 2), _pair(layer.padding, 3)]
    if axis != BATCH:
        before, after = pads
        if before or after:
            spec = (0, 0, before, after) if axis == HEIGHT else (before, after, 0, 0)
            fill = 0.0 if isinstance(layer, nn.Conv2d) else float("-inf")
            x = F.pad(x, spec, value=fill)
        padding[axis - 2] = 0
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, tensors["weight"], tensors.get("bias"), layer.stride, padding,
                        layer.dilation, layer.groups)
    return F.max_pool2d(x, layer.kernel_size, layer.stride, padding, layer.dilation)


def _batch_statistics(layer: nn.Module) -> bool:
    """A BatchNorm that normalises with the batch's own statistics (not running ones)."""
    return isinstance(layer, nn.BatchNorm2d) and (layer.training or
                                                   not layer.track_running_stats)


def _normalise(tensors: dict, h: torch.Tensor, stats) -> torch.Tensor:
    """BatchNorm with the whole map's statistics, which are constants here."""
    mean, invstd = stats
    h = (h - mean[None, :, None, None]) * invstd[None, :, None, None]
    if "weight" in tensors:
        h = h * tensors["weight"][None, :, None, None] + tensors["bias"][None, :, None, None]
    return h


def _parts(size: int, parts: int) -> list[tuple[int, int]]:
    bounds = [size * i // parts for i in range(parts + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


class _Geometry:
    """The chain's windows and map sizes along the axis, and how to cut any prefix of it.

    Exact: a prefix's output is partitioned and each part reads the input rows its receptive
    field needs. Approximate (Split-CNN): the input is partitioned and each part is a map of
    its own, padded at both ends as the layer pads the whole map, so no rows are shared.
    """

    def __init__(self, chain, x: torch.Tensor, parts: int, axis: int,
                 approximate: bool) -> None:
        self.windows = check_splittable(chain, axis)
        self.sizes = [x.shape[axis]]
        for window in self.windows:
            self.sizes.append(window.out_size(self.sizes[-1]))
        if self.sizes[-1] < 1:
            raise ValueError(f"the chain maps {self.sizes[0]} rows along axis {axis} to none")
        self.parts, self.axis, self.approximate = parts, axis, approximate
        if approximate:  # the most patches, up to ``parts``, that keep every map whole
            while self.parts > 1 and not self._independent_fits():
                self.parts -= 1

    def cuts(self, end: int):
        """((input rows, per-layer pads), start, stop) of each part of layer ``end - 1``'s
        output (the whole chain's when ``end`` is its length); the parts partition it."""
        if self.approximate:
            yield from self._independent(end)
            return
        for start, stop in _parts(self.sizes[end], self.parts):
            yield self._halo(end, start, stop), start, stop

    def _halo(self, end: int, start: int, stop: int):
        pads = []
        for window, size in zip(reversed(self.windows[:end]), reversed(self.sizes[:end]),
                                strict=True):
            first, last = window.needs(start, stop)
            start, stop = max(first, 0), min(last, size)
            pads.append((start - first, last - stop))
        return (start, stop), list(reversed(pads))

    def _independent(self, end: int):
        out = 0
        for rows in _parts(self.sizes[0], self.parts):
            size = rows[1] - rows[0]
            for window in self.windows[:end]:
                size = window.out_size(size)
            pads = [(w.padding, w.padding) for w in self.windows[:end]]
            yield (rows, pads), out, out + size
            out += size

    def _independent_fits(self) -> bool:
        """Whether patches processed alone give every layer as many rows as the whole map."""
        return all(sum(stop - start for _, start, stop in self._independent(end)) ==
                   self.sizes[end] for end in range(1, len(self.windows) + 1))


def _run_part(chain, tensors, x, rows, pads, axis, stats, capture=None):
    """The chain on input rows ``rows`` of ``x``; ``capture`` collects each batch-statistics
    BatchNorm's (input, output) by layer index."""
    part = x.narrow(axis, rows[0], rows[1] - rows[0])
    for index, (layer, pad) in enumerate(zip(chain, pads, strict=True)):
        if _batch_statistics(layer):
            out = _normalise(tensors[index], part, stats[index])
            if capture is not None:  # an in-place layer next must not change what we hold
                capture[index] = (part, out)
                out = out.clone()
            part = out
        else:
            part = _apply(layer, tensors[index], part, pad, axis)
    return part


def _channel_sums(t: torch.Tensor) -> torch.Tensor:
    return t.double().sum((0, 2, 3))


def _update_running(layer: nn.BatchNorm2d, tensors: dict, mean: torch.Tensor,
                    var: torch.Tensor, n: int):
    """The running-statistics update of an unsplit training-mode BatchNorm."""
    if not (layer.training and layer.track_running_stats):
        return
    tracked = tensors["num_batches_tracked"]
    tracked.add_(1)
    factor = 1.0 / float(tracked) if layer.momentum is None else layer.momentum
    running_mean, running_var = tensors["running_mean"], tensors["running_var"]
    running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
    unbiased = var * n / max(n - 1, 1)
    running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)


def _statistics(chain, tensors, x, geometry):
    """Each batch-statistics BatchNorm's (mean, 1/std) over the whole map, in order, and its
    element count per channel; running statistics updated as unsplit."""
    stats, counts = {}, {}
    for index, layer in enumerate(chain):
        if not _batch_statistics(layer):
            continue
        n, mean, m2 = 0, 0, 0  # Chan et al.'s parallel variance, in float64, over the parts
        for (rows, pads), _, _ in geometry.cuts(index):
            h = _run_part(chain[:index], tensors, x, rows, pads, geometry.axis, stats).double()
            count = h.numel() // h.shape[1]
            part_mean = h.mean((0, 2, 3))
            part_m2 = ((h - part_mean[None, :, None, None]) ** 2).sum((0, 2, 3))
            delta = part_mean - mean
            mean = mean + delta * (count / (n + count))
            m2 = m2 + part_m2 + delta * delta * (n * count / (n + count))
            n += count
            del h
        var = m2 / n
        stats[index] = (mean.to(x.dtype), (var + layer.eps).rsqrt().to(x.dtype))
        counts[index] = n
        _update_running(layer, tensors[index], mean, var, n)
    return stats, counts


class SplitChain(torch.autograd.Function):
    """Forward in parts without autograd; backward recomputes each part and accumulates.

    Arguments: the input, the chain (a sequence of layers), parts, axis, approximate, a stash
    (None: save the input for backward as autograd does; else a callable taking the input
    and returning an object whose ``rows(axis, start, stop)`` gives those rows back on the
    device), then the parameters that need gradients (so autograd routes them here)."""

    @staticmethod
    def forward(ctx, x, chain, parts, axis, approximate, stash, *params):
        chain = list(chain)
        tensors = _tensors_of(chain)
        geometry = _Geometry(chain, x, parts, axis, approximate)
        stats, counts = _statistics(chain, tensors, x, geometry)
        out = None
        for (rows, pads), start, stop in geometry.cuts(len(chain)):
            part = _run_part(chain, tensors, x, rows, pads, axis, stats)
            if out is None:  # written part by part: never the parts and the whole at once
                shape = list(part.shape)
                shape[axis] = geometry.sizes[-1]
                out = part.new_empty(shape)
            out.narrow(axis, start, stop - start).copy_(part)
            del part
        if stash is None:
            ctx.save_for_backward(x)
            ctx.source = None
        else:
            ctx.source = stash(x)
        ctx.input_shape, ctx.input_dtype = x.shape, x.dtype
        ctx.chain, ctx.tensors, ctx.geometry = chain, tensors, geometry
        ctx.stats, ctx.counts, ctx.params = stats, counts, params
        return out

    @staticmethod
    def backward(ctx, grad):
        source = ctx.source if ctx.source is not None else Held(ctx.saved_tensors[0])
        geometry = ctx.geometry
        backward = _Backward(ctx.chain, ctx.tensors, geometry, ctx.stats, ctx.counts, source,
                             grad)
        for index in sorted(ctx.stats, reverse=True):  # each BatchNorm's sums, last first
            backward.gather_sums(index)
        grad_x = grad.new_zeros(ctx.input_shape, dtype=ctx.input_dtype)
        grad_params = [torch.zeros_like(p) for p in ctx.params]
        for rows, g_in, g_params in backward.final_passes(ctx.params):
            grad_x.narrow(geometry.axis, rows[0], rows[1] - rows[0]).add_(g_in)
            for total, g in zip(grad_params, g_params, strict=True):
                if g is not None:
                    total.add_(g)
            del g_in, g_params
        return (grad_x, None, None, None, None, None, *grad_params)


class _Backward:
    """The passes of SplitChain's backward (see the module docstring)."""

    def __init__(self, chain, tensors, geometry, stats, counts, source, grad) -> None:
        self.chain, self.tensors, self.geometry = chain, tensors, geometry
        self.stats, self.counts = stats, counts
        self.source, self.grad, self.axis = source, grad, geometry.axis
        self.sums: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # S1, S2 per BatchNorm

    def _recompute(self, end: int, rows, pads):
        part_in = self.source.rows(self.axis, *rows).detach()
        part_in.requires_grad_(True)
        capture: dict = {}
        out = _run_part(self.chain[:end], self.tensors, part_in, (0, rows[1] - rows[0]), pads,
                        self.axis, self.stats, capture)
        return part_in, out, capture

    def _correction(self, index: int, u: torch.Tensor) -> torch.Tensor:
        """The part of BatchNorm ``index``'s input gradient that does not depend on g."""
        (mean, invstd), weight = self.stats[index], self.tensors[index].get("weight")
        s1, s2 = self.sums[index]
        n = self.counts[index]
        scale = invstd if weight is None else invstd * weight.detach()
        c = s1.to(u.dtype)[None, :, None, None] / n + \
            (u - mean[None, :, None, None]) * (invstd * invstd * s2.to(u.dtype) / n)[
                None, :, None, None]
        return -scale[None, :, None, None] * c

    def _sources(self, later: list[int]):
        """Every gradient that flows down the chain: the output's, part by part, and each
        later BatchNorm's correction over a partition of its input map. Yields the part's
        input rows, the part's input, its output (where the gradient enters), that gradient
        and the captures."""
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


def split_forward(chain, x: torch.Tensor, parts: int, axis: int = HEIGHT, *,
                  approximate: bool = False, stash=None) -> torch.Tensor:
    """``chain(x)`` computed in ``parts`` parts along ``axis`` (0: batch, 2: height,
    3: width). ``approximate=True`` is Split-CNN: each part is processed as an image of its
    own, with no halo, which changes the function (see the module docstring). ``stash``:
    where backward finds the input (see :class:`SplitChain`; :mod:`.stream`)."""
    if parts < 1:
        raise ValueError(f"parts={parts} must be at least 1")
    _check_first(chain)
    return SplitChain.apply(x, chain, parts, axis, approximate, stash, *needing_grad(chain))
