"""Installing a plan: the one way a :class:`~vmem.control.Plan` is put in force on a model.

:func:`install` reads nothing but the plan (and the model it resolves the plan's names
against): the saves' decisions go to an :class:`~.offload.OffloadExecutor`, the split runs
and those with their cheap layers recomputed (``Plan.splits``, by run name) to a
:class:`~.split_runs.Splits`, the recomputed blocks (``Plan.recomputed``, by block name)
to a :class:`~.blocks.Recomputation`. The :class:`Installed` it returns puts the runs and
blocks in force while active and takes them away again, and runs each of the model's
forwards under the executor's saved-tensor hooks
(:meth:`Installed.forward`). A plan read back with ``Plan.from_json`` installs exactly as
the plan it was written from.

Example::

    >>> import torch
    >>> from vmem import models
    >>> from vmem.control import Plan
    >>> from vmem.feedforward import HostPool, Pools, StagingPool, install
    >>> from vmem.preprocessing.keys import ModuleScope
    >>> from vmem.transfer import make_backend
    >>> model = models.resnet20(10)
    >>> plan = Plan("none", None, None, 0, 1, 2**14, [], [], 0, 0, 0, 0)
    >>> backend = make_backend("torch", torch.device("cpu"))
    >>> pools = Pools(HostPool(backend.host_buffer), StagingPool())
    >>> installed = install(model, plan, pools, backend, scope=ModuleScope(model))
    >>> x = torch.randn(2, 3, 32, 32)
    >>> with installed, installed.forward([x]):
    ...     out = model(x)
    >>> out.sum().backward()
    >>> installed.uninstall()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn

from ..control.plan import Plan
from ..meter import DeviceMeter
from ..preprocessing.keys import ModuleScope
from ..transfer import TransferBackend
from .blocks import Recomputation
from .offload import OffloadExecutor, TransferCounters
from .pools import HostPool, StagingPool
from .split_runs import Splits, choices_of
from .stream import HostStash

__all__ = ["Installed", "Pools", "install"]


class Pools(NamedTuple):
    """The two pools vmem manages (the resident pool is PyTorch's allocator)."""

    host: HostPool
    staging: StagingPool


class Installed:
    """A plan installed on a model: its executor, and its split runs while active.

    Use as a context manager (or :meth:`activate` / :meth:`deactivate`) around the forwards
    that run under the plan, each inside :meth:`forward` (or between :meth:`start_forward`
    and :meth:`end_forward`); :meth:`uninstall` undoes everything it installed.
    """

    def __init__(self, model: nn.Module, plan: Plan, executor: OffloadExecutor,
                 splits: Splits | None, staging: StagingPool,
                 recomputation: Recomputation | None = None) -> None:
        self.model, self.plan, self.executor, self.splits = model, plan, executor, splits
        self.recomputation = recomputation
        self.staging = staging
        self.active = False
        self._hooks = None  # the saved-tensor hooks of the forward running

    def activate(self) -> None:
        """Put the plan's runs and blocks in force (split runs change the forward of their
        ``nn.Sequential`` while active; recomputed blocks only add hooks)."""
        if not self.active:
            if self.splits is not None:
                self.splits.__enter__()
            if self.recomputation is not None:
                self.recomputation.activate()
            self.active = True
        self.staging.stats.capacity = self.plan.staging_bytes  # the plan sized it

    def deactivate(self) -> None:
        """The model as the user wrote it again; the executor keeps what it holds."""
        if self.active and self.splits is not None:
            self.splits.__exit__(None, None, None)
        if self.active and self.recomputation is not None:
            self.recomputation.deactivate()
        self.active = False

    def __enter__(self) -> Installed:
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def start_forward(self, inputs: list[torch.Tensor]) -> None:
        """A forward of the model on ``inputs`` begins: its saves go through the plan."""
        self.end_forward()  # left open if the last forward was interrupted
        self.executor.start_forward(_resident_keys(self.model, inputs))
        self._hooks = self.executor.hooks()
        self._hooks.__enter__()

    def end_forward(self) -> None:
        if self._hooks is not None:
            self.executor.end_forward()
            self._hooks.__exit__(None, None, None)
            self._hooks = None

    @contextlib.contextmanager
    def forward(self, inputs: list[torch.Tensor]) -> Iterator[None]:
        """Run one forward of the model on ``inputs`` inside."""
        self.start_forward(inputs)
        try:
            yield
        finally:
            self.end_forward()

    def uninstall(self) -> None:
        """Take the runs away, end a forward left open, and wait for the executor's copies
        in flight."""
        self.end_forward()
        self.deactivate()
        self.executor.synchronize()


def install(model: nn.Module, plan: Plan, pools: Pools, backend: TransferBackend, *,
            scope: ModuleScope, device: torch.device | None = None,
            counters: TransferCounters | None = None,
            meter: DeviceMeter | None = None) -> Installed:
    """``plan`` made executable on ``model`` (not yet active: see :class:`Installed`).

    ``scope`` names the saves (:meth:`Installed.forward` opens it over each forward);
    ``device``: the model's (default: its first parameter's); ``counters``: shared with
    other installed plans; ``meter``: the device bytes in use, for the safety net.

    Raises:
        ValueError: the plan splits a run or recomputes a block that ``model`` does not
            have.
    """
    if device is None:
        device = next((t.device for t in [*model.parameters(), *model.buffers()]),
                      torch.device("cpu"))
    choices = choices_of(model, plan.splits)
    splits = Splits(model, choices, plan.approximate,
                    HostStash(backend, pools.host, device)) if choices else None
    recomputation = Recomputation(model, [r.block for r in plan.recomputed]) \
        if plan.recomputed else None
    executor = OffloadExecutor(plan, device, backend, pools.host, pools.staging,
                               _resident_keys(model, []), scope, counters, meter)
    return Installed(model, plan, executor, splits, pools.staging, recomputation)


def _resident_keys(model: nn.Module, inputs: list[torch.Tensor]) -> set[int]:
    """Storages that never leave the device: parameters, buffers, the forward's inputs."""
    return {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers(),
                                                  *inputs]}
