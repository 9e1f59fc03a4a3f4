"""Layer times of real training steps: what each layer costs under the plan in force.

The profiler (:mod:`.profile`) plans from a shape-only step, so a plan's predicted time rests
on FLOPs at the device's compute rate. :class:`LayerTimer` times the session's own steps
instead, per leaf module of the model that the plan's profile names (a layer that is no leaf
module, such as a residual add, is not timed). It lives here, beside the profiler, because
it measures what the network costs, as the profiler does, with the same clock: CUDA events
on a GPU, the host clock elsewhere.

- Forward: a leaf module's forward pre- and post-hooks bracket its forward.
- Backward: when a module's forward ends, a pre-hook on its output's autograd node marks
  where its backward starts; that backward lasts until the next timed layer's starts, or the
  backward pass ends (a callback queued on autograd's engine). A span therefore also holds
  its parameters' gradient accumulation and any untimed operator that runs before the next
  timed layer (a residual add's backward).

A step includes what the plan adds (offloads, prefetch waits, recomputation in backward):
measured times are what the layers cost under that plan. A split run (``SplitRun``) is one
leaf module, so it is timed as one layer. Calls a module makes again in a step are named as
the profiler names them (``relu#1``).

Note: [Timing never synchronises]
Marks are only recorded during a step; a step's CUDA events are read once its last one has
completed (``Event.query``), checked when a later step starts, so timing never makes the
host wait for the device.

Example::

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    >>> timer = LayerTimer(model, ["0", "1", "2"], torch.device("cpu"))
    >>> for _ in range(3):
    ...     timer.start_step()
    ...     model(torch.randn(4, 8)).sum().backward()
    >>> timer.stop()
    >>> len(timer.finished()), sorted(timer.median(skip=1))
    (3, ['0', '1', '2'])
"""

from __future__ import annotations

import functools
import statistics
from collections import Counter
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .profile import _Clock

__all__ = ["LayerTimer"]


class _Step:
    """The marks of one step: forward spans, backward starts, and the end of backward."""

    def __init__(self) -> None:
        self.forward: list[tuple[str, object, object]] = []  # (layer, start, end)
        self.backward: list[tuple[str, object]] = []  # (layer, start), in the order they ran
        self.calls: Counter[str] = Counter()  # forward calls per module so far
        self.open: dict[nn.Module, tuple[str, object]] = {}  # forwards running
        self.forward_over = False
        self.end = None  # the mark where backward ended; None until then

    def times(self, clock: _Clock) -> dict[str, tuple[float, float]]:
        """Forward and backward milliseconds per layer."""
        forward: Counter[str] = Counter()
        backward: Counter[str] = Counter()
        for name, start, end in self.forward:
            forward[name] += clock.elapsed_ms(start, end)
        ends = [mark for _, mark in self.backward[1:]] + [self.end]
        for (name, start), end in zip(self.backward, ends, strict=True):
            backward[name] += clock.elapsed_ms(start, end)
        return {name: (forward[name], backward[name]) for name in forward.keys() | backward}


class LayerTimer:
    """Per-layer forward and backward times of the training steps it is told of.

    ``layers``: the profile's names of the layers to time (leaf module paths, ``name#k``
    for a module's k-th extra call). Call :meth:`start_step` as each step's forward begins
    (it attaches the hooks), :meth:`end_forward` as it ends, and :meth:`stop` to remove
    the hooks; a step counts once its backward has ended.
    """

    def __init__(self, model: nn.Module, layers: Iterable[str], device: torch.device) -> None:
        self.model = model
        self.layers = set(layers)
        self.clock = _Clock(device)
        self._step: _Step | None = None  # the step being recorded
        self._unread: list[_Step] = []  # ended, their marks perhaps not yet reached
        self._read: list[dict[str, tuple[float, float]]] = []
        self._handles: list = []

    def start_step(self) -> None:
        """A step's forward begins: keep the last step if its backward ended, record this."""
        self._keep_last()
        self._step = _Step()
        if not self._handles:
            self._attach()

    def end_forward(self) -> None:
        """The model's forward is over: later module calls (before backward) are not its."""
        if self._step is not None:
            self._step.forward_over = True

    def stop(self) -> None:
        """Remove the hooks; the last step counts if its backward has ended."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._keep_last()

    def finished(self) -> list[dict[str, tuple[float, float]]]:
        """Per finished step whose marks the device has reached, ``{layer: (fwd, bwd)}`` ms."""
        # See Note: [Timing never synchronises]
        self._keep_last()  # its backward may have ended since
        while self._unread and self.clock.passed(self._unread[0].end):
            self._read.append(self._unread.pop(0).times(self.clock))
        return self._read

    def median(self, skip: int = 0) -> dict[str, tuple[float, float]]:
        """Each layer's median forward and backward ms over the finished steps but the
        first ``skip`` (warm-up); a layer missing from a step counts 0 there."""
        steps = self.finished()[skip:]
        names = set().union(*steps) if steps else set()
        return {name: (statistics.median(s.get(name, (0.0, 0.0))[0] for s in steps),
                       statistics.median(s.get(name, (0.0, 0.0))[1] for s in steps))
                for name in names}

    # -- hooks ------------------------------------------------------------------------
    def _keep_last(self) -> None:
        if self._step is not None and self._step.end is not None:
            self._unread.append(self._step)
        self._step = None

    def _attach(self) -> None:
        bases = {name.split("#")[0] for name in self.layers}
        for name, module in self.model.named_modules():
            if name in bases and next(module.children(), None) is None:
                self._handles += [
                    module.register_forward_pre_hook(functools.partial(self._starts, name)),
                    module.register_forward_hook(functools.partial(self._ends, name))]

    def _starts(self, base: str, module: nn.Module, args) -> None:
        step = self._step
        if step is None or step.forward_over or step.backward or not torch.is_grad_enabled():
            return
        step.calls[base] += 1
        name = base if step.calls[base] == 1 else f"{base}#{step.calls[base] - 1}"
        if name in self.layers:
            step.open[module] = (name, self.clock.mark())

    def _ends(self, base: str, module: nn.Module, args, output) -> None:
        step = self._step
        opened = None if step is None else step.open.pop(module, None)
        if opened is None:
            return
        name, start = opened
        step.forward.append((name, start, self.clock.mark()))
        nodes = {id(t.grad_fn): t.grad_fn for t in tree_flatten(output)[0]
                 if isinstance(t, torch.Tensor) and t.grad_fn is not None}
        for node in nodes.values():
            node.register_prehook(functools.partial(self._backward_starts, step, name))

    def _backward_starts(self, step: _Step, name: str, grad_outputs) -> None:
        if step is not self._step or step.end is not None:  # an old graph, or backward again
            return
        if not step.backward:
            torch.autograd.Variable._execution_engine.queue_callback(
                functools.partial(self._backward_ends, step))
        step.backward.append((name, self.clock.mark()))

    def _backward_ends(self, step: _Step) -> None:
        step.end = self.clock.mark()
