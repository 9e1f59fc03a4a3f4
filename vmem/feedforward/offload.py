"""The offload executor: carries out a plan inside autograd through saved-tensor hooks.

Every tensor autograd saves in the model's forward passes through :meth:`pack`. Parameters,
buffers, the forward's inputs (the caller holds them anyway) and saves under the plan's size
floor pass through untouched. The others are *tracked*: numbered in the order their storage
is first saved, which is the order the profile saw, so the n-th tracked save takes the plan's
n-th decision. A storage saved twice is copied once, unless it was changed in place between
the two saves. An offloaded storage's bytes are copied whole to the host pool (views and
non-contiguous tensors are rebuilt exactly over the fetched-back bytes), and the device
storage is released as soon as the forward code lets go of it.

In backward, :meth:`unpack` of any tracked save of segment ``j`` issues the prefetch of every
offloaded storage needed in segments ``j - distance`` and above not yet on its way: the rule
:mod:`vmem.control.memory` predicts with. (Unpack hooks are how backward announces its
progress; no module backward hooks are needed, so in-place layers stay legal.)
"""

from __future__ import annotations

import dataclasses
import logging
import weakref

import torch

from ..control.plan import OFFLOAD, Plan
from ..transfer import TransferBackend
from ..transfer.compression import compressed_nbytes, count_nonzero
from .pools import HostPool, StagingPool

__all__ = ["OffloadExecutor", "TransferCounters"]

log = logging.getLogger("vmem")


class _Stored:
    """One copy of a storage in the host pool, and its device copy while fetched back."""

    __slots__ = ("nbytes", "segment", "host", "elem_size", "offloaded", "original", "version",
                 "device", "fetched", "consumed", "freed_copy", "packs", "unpacks", "backend",
                 "give_back", "__weakref__")

    def __init__(self, t: torch.Tensor, segment: int, host: torch.Tensor, give_back,
                 backend: TransferBackend, source: torch.Tensor, elem_size: int) -> None:
        self.nbytes, self.segment, self.host, self.give_back = source.numel(), segment, host, \
            give_back
        self.backend, self.elem_size = backend, elem_size  # elem_size 0: copied raw
        if elem_size:  # event of the copy out
            self.offloaded = backend.offload_compressed(source, host, elem_size)
        else:
            self.offloaded = backend.offload(source, host)
        self.original = weakref.ref(t)  # the saved tensor, while the forward code holds it
        self.version = t._version
        self.device: torch.Tensor | None = None  # the copy back, until its last unpack
        self.freed_copy = None  # a weak reference to it after that
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


class _Entry:
    """What the executor knows of a storage saved in this step, while the storage lives."""

    __slots__ = ("segment", "stored")

    def __init__(self, segment: int, stored: _Stored | None) -> None:
        self.segment = segment
        self.stored = None if stored is None else weakref.ref(stored)  # None: kept


class _Packed:
    """What autograd holds for an offloaded save: the copy and the view over it."""

    __slots__ = ("stored", "dtype", "offset", "shape", "stride", "source", "version",
                 "unpacked")

    def __init__(self, stored: _Stored, t: torch.Tensor) -> None:
        self.stored, self.dtype = stored, t.dtype
        self.offset, self.shape, self.stride = t.storage_offset(), t.shape, t.stride()
        self.source, self.version = weakref.ref(t), t._version
        self.unpacked = False  # a node may read its saved tensors more than once


class _Kept:
    """A tracked save that stays on the device; its unpack still marks backward's progress."""

    __slots__ = ("tensor", "segment")

    # Note: [A kept save holds no graph]
    # It holds a detached alias (same storage and version counter, no grad_fn): a saved
    # output holding itself would close a cycle -- its grad_fn holds this object, which
    # holds the output, which holds its grad_fn -- that Python's collector cannot see
    # through the C++ graph, so a forward whose backward never runs (evaluation with
    # gradients on) would leak its kept saves. Autograd rebuilds the unpacked tensor's
    # grad_fn from its own metadata, as it does for save_on_cpu's copies.
    def __init__(self, tensor: torch.Tensor, segment: int) -> None:
        self.tensor, self.segment = tensor.detach(), segment


@dataclasses.dataclass
class TransferCounters:
    """Bytes moved, in all steps (shared by the executors of one session)."""

    offloaded_bytes: int = 0
    prefetched_bytes: int = 0
    reused_bytes: int = 0  # offloaded, but still on the device when backward needed it
    compressed_saves: int = 0  # offloads that crossed the link compressed


class OffloadExecutor:
    """Pack and unpack hooks for one plan on one device."""

    def __init__(self, plan: Plan, device: torch.device, backend: TransferBackend,
                 host_pool: HostPool, staging: StagingPool, resident: set[int],
                 counters: TransferCounters | None = None) -> None:
        self.plan, self.device, self.backend = plan, device, backend
        self.host_pool, self.staging, self.resident = host_pool, staging, resident
        self.segments = max((s.segment for s in plan.saves), default=0) + 1
        self.counters = counters or TransferCounters()
        self.layer = "-"  # the layer of the latest tracked save, for error messages
        # When a dict: each tracked save's storage adds its non-zero elements (a count on the
        # device) and its elements to {(layer, bytes): [count, elements]}, for the planner's
        # compression choice (read after the steps).
        self.density_samples: dict[tuple[str, int], list] | None = None
        self._warned = False
        self.start_forward(resident)
        host_pool.reserve(plan.host_bytes, slices=plan.offloaded + len(plan.splits))

    def start_forward(self, resident: set[int]) -> None:
        """Reset the per-step state as the model's forward begins; ``resident`` are the
        storages that never leave (parameters, buffers, this forward's inputs)."""
        self.resident = resident
        self.ordinal = 0
        self.alive: dict[int, _Entry] = {}  # storage -> its entry, while the storage lives
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
            entry = self._first_save(t, storage, nbytes)
            self.alive[key] = entry
            weakref.finalize(storage, self.alive.pop, key, None)
        if entry.stored is None or t.is_complex():  # kept (complex views: their conj bits)
            return _Kept(t, entry.segment)
        stored = entry.stored()
        if stored is None or stored.version != t._version:  # its graph is gone, or the
            stored = self._offload(t, storage, entry.segment)  # bytes changed since: copy anew
            if stored is None:
                return _Kept(t, entry.segment)
            entry.stored = weakref.ref(stored)
        stored.packs += 1
        return _Packed(stored, t)

    def _first_save(self, t: torch.Tensor, storage, nbytes: int) -> _Entry:
        decisions = self.plan.saves
        ordinal, self.ordinal = self.ordinal, self.ordinal + 1
        if ordinal >= len(decisions) or decisions[ordinal].nbytes != nbytes:
            self._out_of_sync(ordinal, nbytes)
            return _Entry(self.segments - 1, None)
        decision = decisions[ordinal]
        self.layer = decision.layer
        if self.density_samples is not None:
            self._sample_density(t, storage, decision.layer)
        if decision.action != OFFLOAD or not self.in_sync or t.is_complex():
            return _Entry(decision.segment, None)
        stored = self._offload(t, storage, decision.segment, decision.compress)
        return _Entry(decision.segment, stored)

    def _sample_density(self, t: torch.Tensor, storage, layer: str) -> None:
        """Add the storage's non-zero elements, as the compressed format counts them (bit
        patterns of ``t``'s element size), to ``density_samples``."""
        nbytes, elem_size = storage.nbytes(), t.element_size()
        if not t.dtype.is_floating_point or nbytes % elem_size:
            return
        elements = torch.empty(0, dtype=t.dtype, device=self.device).set_(
            storage, 0, (nbytes // elem_size,))
        sample = self.density_samples.setdefault((layer, nbytes), [0, 0])
        with self.backend.scratch():  # a bounded temporary and a scalar (in the headroom)
            sample[0] = sample[0] + count_nonzero(elements)
        sample[1] += nbytes // elem_size

    def _offload(self, t: torch.Tensor, storage, segment: int,
                 compress: bool = False) -> _Stored | None:
        """Copy ``storage`` to a host slice, compressed if the plan says so and the backend
        can; None (keep it) when the host budget is spent.

        The returned object is referenced only by the waiting list and by what autograd
        holds, so its host slice goes back as soon as the graph lets go of it."""
        nbytes, elem_size = storage.nbytes(), t.element_size()
        if not (compress and self.backend.compresses and nbytes % elem_size == 0):
            elem_size = 0
        slot = self.host_pool.take(compressed_nbytes(nbytes // elem_size, elem_size,
                                                     nbytes // elem_size)
                                   if elem_size else nbytes)
        if slot is None:
            self._warn(f"the host budget is spent; keeping {self.layer}'s save on the device "
                       "(raise VMEM_HOST_BUDGET)")
            return None
        source = torch.empty(0, dtype=torch.uint8, device=self.device).set_(storage)
        stored = _Stored(t, segment, *slot, self.backend, source, elem_size)
        self.counters.compressed_saves += elem_size > 0
        self.waiting[segment].append(stored)
        self.counters.offloaded_bytes += stored.nbytes
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
        source = packed.source()
        if source is not None and source._version != packed.version:
            raise RuntimeError(  # what autograd says when it holds the tensor itself
                "one of the variables needed for gradient computation has been modified by an "
                f"inplace operation: a saved {packed.dtype} tensor of shape "
                f"{list(packed.shape)} is at version {source._version}; expected version "
                f"{packed.version} instead")
        stored = packed.stored
        device = self._device_copy(stored)
        t = torch.empty(0, dtype=packed.dtype, device=self.device).set_(
            device.untyped_storage(), packed.offset, packed.shape, packed.stride)
        if not packed.unpacked:
            packed.unpacked = True
            stored.unpacks += 1
        if stored.unpacks == stored.packs:  # every save of it is unpacked: autograd holds it
            stored.freed_copy = weakref.ref(device.untyped_storage())
            stored.device = None
        return t

    def _device_copy(self, stored: _Stored) -> torch.Tensor:
        """The storage's bytes on the device, fetched back if nothing holds them there."""
        if stored.device is None:
            copy = stored.freed_copy() if stored.freed_copy else None
            if copy is not None:  # a node unpacks it again while autograd still holds it
                stored.device = torch.empty(0, dtype=torch.uint8, device=self.device).set_(copy)
            else:
                self._fetch(stored, ahead=False)
        self.backend.consume(stored.device, stored.fetched)
        stored.consumed = True
        return stored.device

    def _issue_down_to(self, floor: int) -> None:
        floor = max(floor, 0)
        for segment in range(floor, self.issued_from):
            batch, batched = [], 0  # a segment's prefetches go to the backend together
            for stored in self.waiting[segment]:
                if (stored.device is None and self.staging.admits(batched + stored.nbytes)
                        and not self._reuse(stored)):
                    batch.append(stored)
                    batched += stored.nbytes
            self._fetch_many(batch, ahead=True)
            self.waiting[segment].clear()
        self.issued_from = min(self.issued_from, floor)

    def _fetch(self, stored: _Stored, ahead: bool) -> None:
        if not self._reuse(stored):
            self._fetch_many([stored], ahead)

    def _reuse(self, stored: _Stored) -> bool:
        """Whether the forward code still holds the storage, unchanged: then no copy back."""
        original = stored.original()
        if original is None or original._version != stored.version:
            return False
        source = original.untyped_storage()
        stored.device = torch.empty(0, dtype=torch.uint8, device=self.device).set_(source)
        stored.fetched = None
        self.counters.reused_bytes += stored.nbytes
        return True

    def _fetch_many(self, batch: list[_Stored], ahead: bool) -> None:
        raw = [stored for stored in batch if not stored.elem_size]
        fetched = self.backend.prefetch_many([(s.host, s.offloaded) for s in raw])
        for stored, (device, event) in zip(raw, fetched, strict=True):
            stored.device, stored.fetched = device, event
        for stored in batch:
            if stored.elem_size:
                stored.device, stored.fetched = self.backend.prefetch_compressed(
                    stored.host, stored.nbytes, stored.elem_size, stored.offloaded)
            stored.consumed = False
            self.staging.track(stored.device, ahead)
            self.counters.prefetched_bytes += stored.nbytes

    @property
    def offloaded_bytes(self) -> int:
        return self.counters.offloaded_bytes

    @property
    def prefetched_bytes(self) -> int:
        return self.counters.prefetched_bytes

    @property
    def reused_bytes(self) -> int:
        return self.counters.reused_bytes

    def synchronize(self) -> None:
        self.backend.synchronize()
