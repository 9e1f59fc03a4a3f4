"""Split runs: where a model's layers can run split, and running them so during a session.

A *run* is a stretch of consecutive children of an ``nn.Sequential`` (whose class keeps
``nn.Sequential.forward``: a subclass with its own forward is no chain) that :mod:`.split`
can split (convolutions, BatchNorm, pointwise layers, max pooling), starting at a convolution
(never at an in-place layer, which would write into the caller's tensor) and ending after
each pooling layer, so that a VGG block is one run and its halo stays a few rows.
:class:`Splits` makes chosen runs execute in parts: it gives each such ``Sequential`` a
parameterless :class:`SplitRun` child per run and a ``forward`` that calls it in place of
the run's layers, and takes both away again. Parameters, buffers and ``state_dict`` never
change; the profiler sees each split run as one layer, named
``<sequential>.vmem_split_<start>_<stop>``. (Do not ``copy.deepcopy`` the model while
splits are installed: the copy's ``forward`` would still run the original's layers.)

Example::

    >>> import torch
    >>> from vmem import models
    >>> model = models.vgg11(num_classes=10).eval()  # eval: no dropout in the classifier
    >>> runs = find_runs(model)
    >>> [r.name for r in runs][:2]
    ['features[0:3]', 'features[3:6]']
    >>> x = torch.randn(2, 3, 32, 32)
    >>> with Splits(model, {r: (4, 2) for r in runs}):
    ...     out = model(x)
    >>> torch.allclose(out, model(x), atol=1e-5)
    True
"""

from __future__ import annotations

import dataclasses
import types

import torch
from torch import nn

from .recompute import cheap_forward
from .split import BATCH, check_splittable, split_forward

__all__ = ["Run", "SplitRun", "Splits", "choices_of", "find_runs"]


@dataclasses.dataclass(frozen=True)
class Run:
    """Children ``[start, stop)`` of the ``nn.Sequential`` named ``container``."""

    container: str
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.container}[{self.start}:{self.stop}]"

    @property
    def module_name(self) -> str:
        """The profiled layer's name while the run is split."""
        prefix = f"{self.container}." if self.container else ""
        return f"{prefix}vmem_split_{self.start}_{self.stop}"

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(model.get_submodule(self.container))[self.start:self.stop]

    def layer_names(self) -> list[str]:
        """The run's layers' names in a profile of the unsplit model."""
        prefix = f"{self.container}." if self.container else ""
        return [f"{prefix}{i}" for i in range(self.start, self.stop)]


def _splittable(layer: nn.Module) -> bool:
    try:
        check_splittable([layer], BATCH)
    except ValueError:
        return False
    return True


def find_runs(model: nn.Module) -> list[Run]:
    """Every run of ``model``, in module order (see the module docstring)."""
    runs = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential) or \
                type(module).forward is not nn.Sequential.forward:
            continue  # a subclass with its own forward is no chain (pytorchcv's Concurrent)
        start = None
        children = list(module)
        for index, layer in enumerate([*children, None]):
            if layer is not None and _splittable(layer):
                if start is None and not isinstance(layer, nn.Conv2d):
                    continue  # a run starts at a convolution
                start = index if start is None else start
                if not isinstance(layer, nn.MaxPool2d):
                    continue
                index += 1  # the pooling layer closes the run
            if start is not None and any(isinstance(c, nn.Conv2d)
                                         for c in children[start:index]):
                runs.append(Run(name, start, index))
            start = None
    return runs


def choices_of(model: nn.Module, splits) -> dict[Run, tuple[int, int]]:
    """``{run: (parts, axis)}`` of a plan's split decisions (``Plan.splits``), each run found
    among ``model``'s by its name; a name that is not a run of ``model`` raises ValueError."""
    runs = {run.name: run for run in find_runs(model)}
    choices = {}
    for split in splits:
        if split.run not in runs:
            raise ValueError(
                f"the plan splits or recomputes {split.run!r}, which is not a run of layers of "
                f"this {type(model).__name__} (its runs: {', '.join(runs) or 'none'}); "
                "install a plan made for this model")
        choices[runs[split.run]] = (split.parts, split.axis)
    return choices


class SplitRun(nn.Module):
    """Runs its layers in ``parts`` parts along ``axis``; with none, whole, recomputing
    only their cheap layers in backward (:mod:`.recompute`). Holds
    them in a plain list, so it adds no parameters and is a leaf to module hooks."""

    convolves = True  # the profile counts it as a convolution: it starts a segment
    vmem_internal = True  # installed and removed by vmem: saves in it are its parent's

    def __init__(self, layers: list[nn.Module], parts: int, axis: int,
                 approximate: bool = False, stash=None) -> None:
        super().__init__()
        self.layers, self.parts, self.axis, self.approximate = layers, parts, axis, approximate
        self.stash = stash

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parts == 0:
            return cheap_forward(self.layers, x)
        return split_forward(self.layers, x, self.parts, self.axis,
                             approximate=self.approximate, stash=self.stash)

    def extra_repr(self) -> str:
        mode = ", approximate" if self.approximate else ""
        return f"{len(self.layers)} layers, parts={self.parts}, axis={self.axis}{mode}"


def _sequential_forward(children: list[nn.Module], runs: dict[int, tuple[int, SplitRun]]):
    def forward(self, x):
        index = 0
        while index < len(children):
            if index in runs:
                index, run = runs[index]
                x = run(x)
            else:
                x = children[index](x)
                index += 1
        return x
    return forward


class Splits:
    """Context manager: the chosen runs of ``model`` execute split while it is entered.

    ``choices`` maps each :class:`Run` to split to ``(parts, axis)``, zero parts meaning
    not split but its cheap layers recomputed; runs not in it stay as they are.
    ``stash``: where split runs keep
    their input for backward (:mod:`.stream`); None keeps it on the device."""

    def __init__(self, model: nn.Module, choices: dict[Run, tuple[int, int]],
                 approximate: bool = False, stash=None) -> None:
        self.model, self.approximate, self.stash = model, approximate, stash
        self.choices = dict(choices)
        self._installed: list[tuple[nn.Sequential, list[str]]] = []

    def __enter__(self) -> Splits:
        by_container: dict[str, list[Run]] = {}
        for run in self.choices:
            by_container.setdefault(run.container, []).append(run)
        try:
            for container, runs in by_container.items():
                self._install(self.model.get_submodule(container), runs)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _install(self, sequential: nn.Sequential, runs: list[Run]) -> None:
        children = list(sequential)
        table, names = {}, []
        self._installed.append((sequential, names, sequential.__dict__.get("forward")))
        for run in sorted(runs, key=lambda r: r.start):
            parts, axis = self.choices[run]
            layers = children[run.start:run.stop]
            check_splittable(layers, axis)
            split = SplitRun(layers, parts, axis, self.approximate, self.stash)
            name = run.module_name.rsplit(".", 1)[-1]
            names.append(name)  # recorded first: __exit__ undoes a partial install too
            sequential.add_module(name, split)
            table[run.start] = (run.stop, split)
        sequential.forward = types.MethodType(_sequential_forward(children, table), sequential)

    def __exit__(self, *exc) -> None:
        for sequential, names, forward in reversed(self._installed):
            for name in names:
                sequential._modules.pop(name, None)
            sequential.__dict__.pop("forward", None)
            if forward is not None:
                sequential.forward = forward
        self._installed = []
