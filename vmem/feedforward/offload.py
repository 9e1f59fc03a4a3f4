"""The offload executor: carries out a plan inside autograd through saved-tensor hooks.

Every tensor autograd saves in the model's forward passes through :meth:`pack`. Parameters,
buffers and saves under the plan's size floor pass through untouched. The others are
*tracked*: numbered in the order their storage is first saved, which is the order the profile
saw, so the n-th tracked save takes the plan's n-th decision. A storage saved twice is
handled once. An offloaded storage's bytes are copied whole to the host pool (views and
non-contiguous tensors are rebuilt exactly over the fetched-back bytes), and the device
storage is released as soon as the forward code lets go of it.

In backward, :meth:`unpack` of any tracked save of segment ``j`` issues the prefetch of every
offloaded storage needed in segments ``j - distance`` and above not yet on its way: the rule
:mod:`vmem.control.memory` predicts with.
"""

from __future__ import annotations

import logging
import weakref

import torch

from ..control.plan import OFFLOAD, Plan
from ..transfer import TransferBackend
from .pools import HostPool, StagingPool

__all__ = ["OffloadExecutor"]

log = logging.getLogger("vmem")


class _Stored:
    """One offloaded storage: its host copy, and its device copy while fetched back."""

    __slots__ = ("nbytes", "segment", "host", "offloaded", "original", "device", "fetched",
                 "consumed", "packs", "unpacks", "backend", "give_back")

    def __init__(self, nbytes: int, segment: int, host: torch.Tensor, give_back,
                 backend: TransferBackend, source: torch.Tensor) -> None:
        self.nbytes, self.segment, self.host, self.give_back = nbytes, segment, host, give_back
        self.backend = backend
        self.offloaded = backend.offload(source, host)  # event of the copy out
        self.original = weakref.ref(source.untyped_storage())  # alive while forward holds it
        self.device: torch.Tensor | None = None
        self.fetched = None  # event of the latest copy back
        self.consumed = True  # the compute stream has waited for that copy
        self.packs = 0
        self.unpacks = 0

    def __del__(self) -> None:
        # The graph holding it is gone: give the host slice back. The next step's offload
        # into it waits for the compute stream, which waited for every consumed copy back;
        # only a copy back that nothing consumed must finish first.
        if not self.consumed:
            self.backend.wait(self.fetched)
        self.give_back()


class _Packed:
    """What autograd holds for an offloaded save: the storage and the view over it."""

    __slots__ = ("stored", "dtype", "offset", "shape", "stride")

    def __init__(self, stored: _Stored, t: torch.Tensor) -> None:
        self.stored, self.dtype = stored, t.dtype
        self.offset, self.shape, self.stride = t.storage_offset(), t.shape, t.stride()


class _Kept:
    """A tracked save that stays on the device; its unpack still marks backward's progress."""

    __slots__ = ("tensor", "segment")

    def __init__(self, tensor: torch.Tensor, segment: int) -> None:
        self.tensor, self.segment = tensor, segment


class OffloadExecutor:
    """Pack and unpack hooks for one plan on one device."""

    def __init__(self, plan: Plan, device: torch.device, backend: TransferBackend,
                 host_pool: HostPool, staging: StagingPool, resident: set[int]) -> None:
        self.plan, self.device, self.backend = plan, device, backend
        self.host_pool, self.staging, self.resident = host_pool, staging, resident
        self.segments = max((s.segment for s in plan.saves), default=0) + 1
        self.offloaded_bytes = 0  # in all steps
        self.prefetched_bytes = 0
        self.reused_bytes = 0  # offloaded, but still on the device when backward needed it
        self.layer = "-"  # the layer of the latest tracked save, for error messages
        self._warned = False
        self.start_forward()
        host_pool.reserve(plan.offloaded_bytes)

    def start_forward(self) -> None:
        """Reset the per-step state; called as the model's forward begins."""
        self.ordinal = 0
        self.alive: dict[int, _Stored | _Kept] = {}  # storage -> its entry, while alive
        self.waiting: list[list[_Stored]] = [[] for _ in range(self.segments)]
        self.issued_from = self.segments  # segments >= this have had their prefetch issued
        self.in_sync = True

    # -- forward ----------------------------------------------------------------------
    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.resident or t.device != self.device:
            return t
        entry = self.alive.get(key)
        if entry is None:
            nbytes = storage.nbytes()
            if nbytes < self.plan.min_bytes:
                return t
            entry = self._first_save(storage, nbytes)
            self.alive[key] = entry  # an int (the segment) for a kept storage: no reference
            weakref.finalize(storage, self.alive.pop, key, None)
        if isinstance(entry, int):
            return _Kept(t, entry)
        entry.packs += 1
        return _Packed(entry, t)

    def _first_save(self, storage: torch.UntypedStorage, nbytes: int) -> _Stored | int:
        decisions = self.plan.saves
        ordinal, self.ordinal = self.ordinal, self.ordinal + 1
        if ordinal >= len(decisions) or decisions[ordinal].nbytes != nbytes:
            self._out_of_sync(ordinal, nbytes)
            return self.segments - 1
        decision = decisions[ordinal]
        self.layer = decision.layer
        if decision.action != OFFLOAD or not self.in_sync:
            return decision.segment
        slot = self.host_pool.take(nbytes)
        if slot is None:
            self._warn(f"the host budget is spent; keeping {decision.layer}'s save on the "
                       "device (raise VMEM_HOST_BUDGET)")
            return decision.segment
        source = torch.empty(0, dtype=torch.uint8, device=self.device).set_(storage)
        stored = _Stored(nbytes, decision.segment, *slot, self.backend, source)
        self.waiting[decision.segment].append(stored)
        self.offloaded_bytes += nbytes
        return stored

    def _out_of_sync(self, ordinal: int, nbytes: int) -> None:
        if self.in_sync:
            self._warn(f"tracked save #{ordinal} ({nbytes} bytes) differs from the plan; "
                       "keeping the rest of this step on the device")
        self.in_sync = False

    def _warn(self, message: str) -> None:
        if not self._warned:
            log.warning("vmem: %s", message)
            self._warned = True

    # -- backward ---------------------------------------------------------------------
    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        segment = packed.segment if isinstance(packed, _Kept) else packed.stored.segment
        self._issue_down_to(segment - self.plan.prefetch_distance)
        if isinstance(packed, _Kept):
            return packed.tensor
        stored = packed.stored
        if stored.device is None:
            self._fetch(stored, ahead=False)
        self.backend.consume(stored.device, stored.fetched)
        stored.consumed = True
        t = torch.empty(0, dtype=packed.dtype, device=self.device).set_(
            stored.device.untyped_storage(), packed.offset, packed.shape, packed.stride)
        stored.unpacks += 1
        if stored.unpacks % stored.packs == 0:
            stored.device = None  # the last save of it is unpacked: autograd holds it now
        return t

    def _issue_down_to(self, floor: int) -> None:
        floor = max(floor, 0)
        for segment in range(floor, self.issued_from):
            for stored in self.waiting[segment]:
                if stored.device is None and self.staging.admits(stored.nbytes):
                    self._fetch(stored, ahead=True)
            self.waiting[segment].clear()
        self.issued_from = min(self.issued_from, floor)

    def _fetch(self, stored: _Stored, ahead: bool) -> None:
        original = stored.original()
        if original is not None:  # something besides autograd still holds it: no copy back
            stored.device = torch.empty(0, dtype=torch.uint8, device=self.device).set_(original)
            stored.fetched = None
            self.reused_bytes += stored.nbytes
            return
        stored.device, stored.fetched = self.backend.prefetch(stored.host, stored.offloaded)
        stored.consumed = False
        self.staging.track(stored.device, ahead)
        self.prefetched_bytes += stored.nbytes

    def synchronize(self) -> None:
        self.backend.synchronize()
