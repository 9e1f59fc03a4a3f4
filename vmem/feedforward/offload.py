"""The offload executor: carries out a plan inside autograd through saved-tensor hooks.

Every tensor autograd saves in the model's forward passes through :meth:`pack`. Parameters,
buffers, the forward's inputs (the caller holds them anyway) and saves under the plan's size
floor pass through untouched. The others are *tracked*: each storage's first save is named by
its :class:`~vmem.preprocessing.keys.SaveKey` (the module call saving it, the save's place in
that call, its bytes and dtype; see [Note: Which save is it]) and takes the plan's decision
for that key. A storage saved twice is copied once, unless it was changed in place between
the two saves. An offloaded storage's bytes are copied whole to the host pool (views and
non-contiguous tensors are rebuilt exactly over the fetched-back bytes), and the device
storage is released as soon as the forward code lets go of it.

The safety net (see [Note: The safety net]) offloads a save the plan would keep, or does not
know, when keeping it would take the device past the plan's target, and holds a prefetch
back that would: the plan is a forecast, the bytes in use are a fact.

A step is every forward from the first after a backward up to that backward (two views of a
batch, ``retain_graph``, double backward): per-step state is not reset per forward, and each
forward's saves are fetched back by its own graph's progress.

In backward, :meth:`unpack` of any tracked save of segment ``j`` issues the prefetch of every
offloaded storage of the same forward needed in segments ``j - distance`` and above not yet
on its way: the rule :mod:`vmem.control.memory` predicts with. (Unpack hooks are how backward
announces its progress; no module backward hooks are needed, so in-place layers stay legal.)
"""

from __future__ import annotations

import dataclasses
import logging
import weakref

import torch

from ..control.plan import OFFLOAD, Plan
from ..meter import DeviceMeter
from ..preprocessing.keys import ModuleScope
from ..preprocessing.trace import StepTrace, TracedSave
from ..transfer import TransferBackend
from ..transfer.compression import compressed_nbytes, count_nonzero
from .pools import HostPool, StagingPool

__all__ = ["OffloadExecutor", "TransferCounters"]

log = logging.getLogger("vmem")


class _Stored:
    """One copy of a storage in the host pool, and its device copy while fetched back."""

    __slots__ = ("nbytes", "segment", "forward", "host", "elem_size", "offloaded", "original",
                 "version", "device", "fetched", "consumed", "freed_copy", "packs", "unpacks",
                 "backend", "give_back", "__weakref__")

    def __init__(self, t: torch.Tensor, segment: int, forward: int, host: torch.Tensor,
                 give_back, backend: TransferBackend, source: torch.Tensor,
                 elem_size: int) -> None:
        self.nbytes, self.segment, self.host, self.give_back = source.numel(), segment, host, \
            give_back
        self.forward = forward
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

    __slots__ = ("segment", "forward", "stored", "original", "kept")

    def __init__(self, segment: int, forward: int, stored: _Stored | None,
                 t: torch.Tensor) -> None:
        self.segment, self.forward = segment, forward
        self.stored = None if stored is None else weakref.ref(stored)  # None: kept
        self.original = weakref.ref(t)  # the tensor first saved, while the forward holds it
        self.kept: list[weakref.ref] = []  # its kept saves, which the safety net may evict


class _Packed:
    """What autograd holds for an offloaded save: the copy and the view over it."""

    __slots__ = ("stored", "dtype", "offset", "shape", "stride", "source", "version",
                 "unpacked", "__weakref__")

    def __init__(self, stored: _Stored, t: torch.Tensor) -> None:
        self.stored, self.dtype = stored, t.dtype
        self.offset, self.shape, self.stride = t.storage_offset(), t.shape, t.stride()
        self.source, self.version = weakref.ref(t), t._version
        self.unpacked = False  # a node may read its saved tensors more than once


class _Kept:
    """A tracked save that stays on the device; its unpack still marks backward's progress."""

    __slots__ = ("tensor", "segment", "forward", "version", "evicted", "__weakref__")

    # Note: [A kept save holds no graph]
    # It holds a detached alias (same storage and version counter, no grad_fn): a saved
    # output holding itself would close a cycle -- its grad_fn holds this object, which
    # holds the output, which holds its grad_fn -- that Python's collector cannot see
    # through the C++ graph, so a forward whose backward never runs (evaluation with
    # gradients on) would leak its kept saves. Autograd rebuilds the unpacked tensor's
    # grad_fn from its own metadata, as it does for save_on_cpu's copies.
    def __init__(self, tensor: torch.Tensor, segment: int, forward: int) -> None:
        self.tensor, self.segment, self.forward = tensor.detach(), segment, forward
        self.version = tensor._version  # the alias shares the counter: checked at unpack
        self.evicted: _Packed | None = None  # what unpack reads once the safety net evicted it

    def evict(self, stored: _Stored) -> None:
        """Read the save from ``stored`` (a host copy of its storage) from now on."""
        self.evicted = _Packed(stored, self.tensor)
        stored.packs += 1
        self.tensor = None


@dataclasses.dataclass
class TransferCounters:
    """Bytes moved, in all steps (shared by the executors of one session)."""

    offloaded_bytes: int = 0
    prefetched_bytes: int = 0
    reused_bytes: int = 0  # offloaded, but still on the device when backward needed it
    compressed_saves: int = 0  # offloads that crossed the link compressed
    forced_offloads: int = 0  # saves the safety net offloaded that the plan would keep
    forced_bytes: int = 0
    evicted_saves: int = 0  # kept saves the safety net offloaded later, in a later forward
    evicted_bytes: int = 0
    unplanned_saves: int = 0  # saves whose key the plan does not know
    held_prefetches: int = 0  # prefetches the safety net left to backward's demand


class OffloadExecutor:
    """Pack and unpack hooks for one plan on one device.

    ``scope`` names each save (it must be open over the model's forward: see
    :meth:`start_forward`); ``meter``, when given, reads the device bytes in use for the
    safety net.
    """

    def __init__(self, plan: Plan, device: torch.device, backend: TransferBackend,
                 host_pool: HostPool, staging: StagingPool, resident: set[int],
                 scope: ModuleScope, counters: TransferCounters | None = None,
                 meter: DeviceMeter | None = None) -> None:
        self.device, self.backend, self.scope, self.meter = device, backend, scope, meter
        self.host_pool, self.staging, self.resident = host_pool, staging, resident
        self.counters = counters or TransferCounters()
        self.layer = "-"  # the layer of the latest tracked save, for error messages
        # When a dict: each tracked save's storage adds its non-zero elements (a count on the
        # device) and its elements to {(layer, bytes): [count, elements]}, for the planner's
        # compression choice (read after the steps).
        self.density_samples: dict[tuple[str, int], list] | None = None
        self._warned = False
        self._backward_ran = True  # so that the first forward starts a step
        self._in_backward = False  # a backward is running whose end is awaited
        self._forwards = 0  # forwards so far (a forward's number tells its step's apart)
        self._last_pack = None  # a weak reference to the latest forward's latest tracked save
        self.trace: StepTrace | None = None  # the step being traced: its saves are recorded
        self.plan = plan
        self.decisions = {d.key: d for d in plan.saves if d.key is not None}
        self.segments = max((d.segment for d in plan.saves), default=0) + 1
        self.host_pool.reserve(plan.host_bytes, slices=plan.offloaded + len(plan.splits))
        self._new_step()

    def _new_step(self) -> None:
        self.alive: dict[int, _Entry] = {}  # storage -> its entry, while the storage lives
        self._evictable: list[_Entry] = []  # entries kept so far, first saved first
        # Per forward of the step (by its number in the session): per segment, the offloads
        # not yet fetched back, and the lowest segment whose prefetches were issued.
        self.waiting: dict[int, list[list[weakref.ref]]] = {}
        self.issued_from: dict[int, int] = {}
        self.scope.new_step()
        self._backward_ran, self._last_pack = False, None
        self._segment = 0  # of the latest known save: where an unknown one goes
        self._rise = self.plan.predicted_peak - self.plan.start_bytes  # see the safety net

    def start_forward(self, resident: set[int]) -> None:
        """The model's forward begins; ``resident`` are the storages that never leave
        (parameters, buffers, this forward's inputs). A new step begins unless an earlier
        forward's graph waits for its backward."""
        if self.step_over:
            self._new_step()
        self.resident = resident
        self._forwards += 1
        self.forward = self._forwards
        self.waiting[self.forward] = [[] for _ in range(self.segments)]
        self.issued_from[self.forward] = self.segments
        self.scope.open_model()

    @property
    def step_over(self) -> bool:
        """Whether the next forward starts a new step: a backward ran since the last
        forward, or no graph of this step is alive any more."""
        return self._backward_ran or self._last_pack is None or self._last_pack() is None

    @property
    def forwards(self) -> int:
        """Forwards of the model in the step running (or, once it is over, the last)."""
        return len(self.waiting)

    def end_forward(self) -> None:
        self.scope.close_model()

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        """The saved-tensor hooks to run the model's forward under."""
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    # -- forward ----------------------------------------------------------------------
    def pack(self, t: torch.Tensor):
        ordinal = self.scope.count_save() if self.scope.running else -1
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.resident or t.device != self.device:
            return t
        entry = self.alive.get(key)
        if entry is None:
            nbytes = storage.nbytes()
            if nbytes < self.plan.min_bytes:
                return t
            entry, stored = self._first_save(t, storage, nbytes, ordinal)
            self.alive[key] = entry
            weakref.finalize(storage, self.alive.pop, key, None)
        elif entry.stored is not None:
            stored = entry.stored()
            if stored is None or stored.version != t._version:  # its graph is gone, or the
                stored = self._offload(t, storage, entry.segment)  # bytes changed: copy anew
                entry.stored = None if stored is None else weakref.ref(stored)
        else:
            stored = None
        if stored is None or t.is_complex():  # kept (complex views: their conj bits)
            packed = _Kept(t, entry.segment, entry.forward)
            self._last_pack = weakref.ref(packed)
            entry.kept.append(self._last_pack)
        else:
            stored.packs += 1
            packed = _Packed(stored, t)
            self._last_pack = weakref.ref(packed)
        return packed

    # Note: [The safety net]
    # The plan predicts the device bytes of the step it was made from; the step that runs
    # may hold more (a loss the profile never saw, a second forward, tensors the loop keeps,
    # autocast's copies). At each tracked save the executor reads the bytes in use (the
    # meter: the emulated device's count, the caching allocator's on CUDA) and adds the rise
    # the plan predicts from this save to the end of the step (``SaveDecision.rise``; for a
    # save the plan does not know, the rise after the last one it knew). If that passes the
    # plan's target, the save is offloaded whatever the plan said: offloading more never
    # raises the curve, and a save the plan does not know never makes the executor keep
    # everything after it. In backward a prefetch that would pass the target is not issued
    # ahead; backward fetches it when it needs it. The counters say how often either
    # happened, so a session can tell the plan was wrong and re-plan. When even that does
    # not fit (a second forward the plan never saw, while the first one's kept saves are
    # still there), the saves kept so far that the forward code has let go of are offloaded
    # after all, first saved first: their storages go as soon as their copies are made.
    def _first_save(self, t: torch.Tensor, storage, nbytes: int,
                    ordinal: int) -> tuple[_Entry, _Stored | None]:
        key = self.scope.key(ordinal, nbytes, t.dtype) if ordinal >= 0 else None
        decision = self.decisions.get(key)
        if decision is None:
            self.counters.unplanned_saves += 1
            offload, compress = self.plan.unplanned == OFFLOAD, False
            twin = None if key is None or not key.call else \
                self.decisions.get(key._replace(call=0))
            if twin is not None:  # a later forward's save where the first saved the same
                self._segment, self._rise = twin.segment, twin.rise
        else:
            self._segment, self._rise, self.layer = decision.segment, decision.rise, \
                decision.layer
            offload, compress = decision.action == OFFLOAD, decision.compress
        segment = self._segment
        if self.density_samples is not None and decision is not None:
            self._sample_density(t, storage, decision.layer)
        forced = False
        if self.trace is not None and decision is not None and self.meter is not None:
            self.trace.reach(self.meter.current + self._rise)
        if self._crosses_target(self._rise):
            if not offload:
                offload = forced = True
                self.counters.forced_offloads += 1
                self.counters.forced_bytes += nbytes
            self._evict_kept()
        stored = None if not offload or t.is_complex() else \
            self._offload(t, storage, segment, compress)
        if self.trace is not None:
            self.trace.record(TracedSave(key, nbytes, str(t.dtype).removeprefix("torch."),
                                         "keep" if stored is None else "offload",
                                         decision is not None, forced and stored is not None))
        entry = _Entry(segment, self.forward, stored, t)
        if stored is None:
            self._evictable.append(entry)
        return entry, stored

    def _evict_kept(self) -> None:
        """Offload kept saves that the forward code has let go of, first saved first (needed
        last), until the bytes in use plus the rise fit the target again. (Counted as freed
        when evicted: on CUDA the caching allocator frees a block only once its copy is
        done, and reading it back at once would evict everything.)"""
        freed, still = 0, []
        for position, entry in enumerate(self._evictable):
            if not self._crosses_target(self._rise - freed):
                still += self._evictable[position:]
                break
            kept = [k for k in (ref() for ref in entry.kept) if k is not None and
                    k.tensor is not None and not k.tensor.is_complex()]
            if not kept or entry.stored is not None:
                continue  # its graph is gone, or it was offloaded since: never again here
            if entry.original() is not None or \
                    any(k.tensor._version != k.version for k in kept):
                still.append(entry)  # the forward holds it, or it was changed in place
                continue  # since (unpack raises as autograd would)
            storage = kept[0].tensor.untyped_storage()
            stored = self._offload(kept[0].tensor, storage, entry.segment,
                                   forward=entry.forward)
            if stored is None:  # the host budget is spent
                still += self._evictable[position:]
                break
            entry.stored = weakref.ref(stored)
            self.counters.evicted_saves += 1
            self.counters.evicted_bytes += storage.nbytes()
            freed += storage.nbytes()
            del storage
            for k in kept:
                k.evict(stored)
            del kept
        self._evictable = still

    def _crosses_target(self, extra: int) -> bool:
        """Whether the bytes in use plus ``extra`` pass the plan's target."""
        target = self.plan.target
        return target is not None and self.meter is not None and \
            self.meter.current + extra > target

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

    def _offload(self, t: torch.Tensor, storage, segment: int, compress: bool = False,
                 forward: int | None = None) -> _Stored | None:
        """Copy ``storage`` to a host slice, compressed if the plan says so and the backend
        can; None (keep it) when the host budget is spent.

        The returned object is referenced only by what autograd holds (the waiting list
        holds it weakly), so its host slice goes back as soon as the graph lets go of it."""
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
        forward = self.forward if forward is None else forward
        stored = _Stored(t, segment, forward, *slot, self.backend, source, elem_size)
        self.counters.compressed_saves += elem_size > 0
        self.waiting[forward][segment].append(weakref.ref(stored))
        self.counters.offloaded_bytes += stored.nbytes
        return stored

    def _warn(self, message: str) -> None:
        if not self._warned:
            log.warning("vmem: %s", message)
            self._warned = True

    # -- backward ---------------------------------------------------------------------
    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        if not self._in_backward and torch._C._current_graph_task_id() != -1:
            # The step ends with this backward (not with a read of grad_fn._saved_*).
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)
            self._in_backward = True
        where = packed if isinstance(packed, _Kept) else packed.stored
        if where.forward in self.waiting:  # else a forward of an earlier step
            self._issue_down_to(where.forward, where.segment - self.plan.prefetch_distance)
        if isinstance(packed, _Kept):
            if packed.evicted is None:
                _check_version(packed.tensor, packed.version)
                return packed.tensor
            packed = packed.evicted
        source = packed.source()
        if source is not None:
            _check_version(source, packed.version)
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

    def _backward_done(self) -> None:
        self._in_backward, self._backward_ran = False, True

    def _issue_down_to(self, forward: int, floor: int) -> None:
        floor = max(floor, 0)
        waiting = self.waiting[forward]
        for segment in range(floor, self.issued_from[forward]):
            batch, batched = [], 0  # a segment's prefetches go to the backend together
            for ref in waiting[segment]:
                stored = ref()
                if stored is None or stored.device is not None:
                    continue
                if not self.staging.admits(batched + stored.nbytes) or self._reuse(stored):
                    continue
                if self._crosses_target(batched + stored.nbytes):  # see [Note: The safety net]
                    self.counters.held_prefetches += 1
                    continue
                batch.append(stored)
                batched += stored.nbytes
            self._fetch_many(batch, ahead=True)
            waiting[segment].clear()
        self.issued_from[forward] = min(self.issued_from[forward], floor)

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


def _check_version(t: torch.Tensor, version: int) -> None:
    """Raise what autograd raises when it holds a saved tensor itself and finds it changed."""
    if t._version != version:
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an "
            f"inplace operation: a saved {t.dtype} tensor of shape {list(t.shape)} is at "
            f"version {t._version}; expected version {version} instead")
