"""The device-memory meter: one interface for current and peak device bytes.

On CUDA it reads PyTorch's caching-allocator statistics. On any other device (the emulated
device, ``cpu``, and the shape-only ``meta`` device the profiler runs on) it counts the live
bytes of tensor storage on that device through a dispatch mode, so budget tests run in CI.

Example::

    >>> import torch
    >>> from vmem.meter import DeviceMeter
    >>> with DeviceMeter.for_device("cpu") as meter:
    ...     x = torch.ones(1024)
    >>> meter.peak
    4096
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode_stack
from torch.utils._pytree import tree_flatten

from .errors import OutOfBudget

__all__ = ["DeviceMeter", "CudaMeter", "EmulatedMeter"]


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class DeviceMeter(TorchDispatchMode):
    """Current and peak device bytes, with an optional hard limit.

    Use as a context manager around the work to measure. With ``limit`` set, the first
    operation after which the bytes in use (peak included) exceed it raises
    :class:`vmem.OutOfBudget`, naming the layer that ``where()`` reports (the aten operator
    when ``where`` is not given or returns None).
    """

    def __init__(self, device: torch.device, limit: int | None = None,
                 where: Callable[[], str | None] | None = None) -> None:
        super().__init__()
        self.device = torch.device(device)
        self.limit = limit
        self.where = where

    @staticmethod
    def for_device(device: torch.device | str, limit: int | None = None,
                   where: Callable[[], str | None] | None = None) -> DeviceMeter:
        """The meter for ``device``: allocator statistics on CUDA, counting elsewhere."""
        device = torch.device(device)
        if device.type == "cuda":
            return CudaMeter(device, limit, where)
        return EmulatedMeter(device, limit, where)

    @property
    def current(self) -> int:
        raise NotImplementedError

    @property
    def peak(self) -> int:
        raise NotImplementedError

    def reset_peak(self) -> None:
        raise NotImplementedError

    def start_window(self) -> None:
        """Start measuring :attr:`window_peak` (one step's peak) from the bytes in use now;
        :attr:`peak` stays the peak since the meter started or was reset."""
        raise NotImplementedError

    @property
    def window_peak(self) -> int:
        raise NotImplementedError

    def _check_limit(self, func) -> None:
        if self.limit is not None and self.peak > self.limit:
            layer = (self.where() if self.where else None) or str(func)
            raise OutOfBudget(layer, self.peak, self.limit)


class CudaMeter(DeviceMeter):
    """Reads ``torch.cuda.memory_allocated`` / ``max_memory_allocated`` for one device.

    A window resets the allocator's peak statistics for the whole process (what
    ``torch.cuda.max_memory_allocated`` reads afterwards starts there too); every
    ``CudaMeter`` of the device keeps the earlier maxima in :attr:`peak` and
    :attr:`reserved_peak`. Two windows at once on one device (two sessions tracing their
    steps together) cut each other short.
    """

    def __enter__(self) -> CudaMeter:
        self.reset_peak()
        if self.limit is None:  # reading the allocator needs no hook on every operator
            return self
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        if self.limit is not None:
            super().__exit__(*exc)

    @property
    def current(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    @property
    def peak(self) -> int:
        before, _ = _before_windows(self.device)
        return max(before, torch.cuda.max_memory_allocated(self.device))

    @property
    def reserved_peak(self) -> int:
        """The caching allocator's most reserved bytes, windows or not."""
        _, before = _before_windows(self.device)
        return max(before, torch.cuda.max_memory_reserved(self.device))

    def reset_peak(self) -> None:
        _BEFORE_WINDOWS.pop(_index(self.device), None)
        torch.cuda.reset_peak_memory_stats(self.device)

    def start_window(self) -> None:
        _BEFORE_WINDOWS[_index(self.device)] = (self.peak, self.reserved_peak)
        torch.cuda.reset_peak_memory_stats(self.device)

    @property
    def window_peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._check_limit(func)
        return out


_BEFORE_WINDOWS: dict[int, tuple[int, int]] = {}  # per CUDA device: the allocated and
# reserved peaks before the latest window reset the allocator's statistics


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _before_windows(device: torch.device) -> tuple[int, int]:
    return _BEFORE_WINDOWS.get(_index(device), (0, 0))


class EmulatedMeter(DeviceMeter):
    """Counts live storage bytes on a non-CUDA device.

    A storage counts from the operation that creates it until it is freed (a weakref
    finalizer); views and in-place results share an input's storage and add nothing.
    Storages that existed before the meter started count only once passed to :meth:`track`;
    storages passed to :meth:`exclude` (the host pool's, which stand for pinned host memory on
    the emulated device) never count. Fake tensors (a shape-only profile's, which report a
    real device but hold nothing) count only for a meter made with ``fake=True``.
    """

    def __init__(self, device: torch.device, limit: int | None = None,
                 where: Callable[[], str | None] | None = None, fake: bool = False) -> None:
        super().__init__(device, limit, where)
        self.fake = fake
        self._live: dict[int, int] = {}  # storage key -> bytes
        self._storages: dict[int, weakref.ref] = {}  # storage key -> the storage
        self._excluded: set[int] = set()
        self._current = 0
        self._peak = 0
        self._window_peak = 0
        self._paused = False

    @property
    def current(self) -> int:
        return self._current

    @property
    def peak(self) -> int:
        return self._peak

    def reset_peak(self) -> None:
        self._peak = self._current

    def start_window(self) -> None:
        self._window_peak = self._current

    @property
    def window_peak(self) -> int:
        return self._window_peak

    @contextlib.contextmanager
    def paused(self):
        """Count nothing new inside (vmem's own bookkeeping tensors, e.g. while planning)."""
        self._paused, was = True, self._paused
        try:
            yield
        finally:
            self._paused = was

    # Note: [One emulated device]
    # Two sessions at once (two models trained side by side) each run a meter, and each
    # meter sees every operation while it is active; but a tensor made before a meter
    # started counts only once tracked. On CUDA both sessions read the same allocator, so
    # here what one meter is told to track or exclude, every active meter of the same device
    # is told too, and a meter starting takes over what those already count: all of them
    # count the one emulated device.
    def __enter__(self) -> EmulatedMeter:
        peers = self._peers()
        super().__enter__()
        for peer in peers:
            self._excluded |= peer._excluded
            for ref in list(peer._storages.values()):
                storage = ref()
                if storage is not None:
                    self._add(storage)
        return self

    def _peers(self) -> list[EmulatedMeter]:
        """The other meters counting this device's real tensors (a fake one has none)."""
        if self.fake:
            return []
        return [mode for mode in _get_current_dispatch_mode_stack()
                if isinstance(mode, EmulatedMeter) and mode is not self and
                mode.device == self.device and not mode.fake]

    def track(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count tensors that existed before the meter started (parameters, state)."""
        tensors = [t for t in tensors if t.device == self.device]
        for meter in [self, *self._peers()]:
            for t in tensors:
                meter._add(t.untyped_storage())

    def exclude(self, tensor: torch.Tensor) -> None:
        """Never count ``tensor``'s storage (stop counting it if it was counted)."""
        storage = tensor.untyped_storage()
        key = storage._cdata
        for meter in [self, *self._peers()]:
            meter._excluded.add(key)
            meter._release(key)
            weakref.finalize(storage, meter._excluded.discard, key)

    def _add(self, storage: torch.UntypedStorage) -> None:
        key, nbytes = storage._cdata, storage.nbytes()
        if key in self._excluded:
            return
        if key not in self._live:
            weakref.finalize(storage, self._release, key)
            self._storages[key] = weakref.ref(storage)
        self._current += nbytes - self._live.get(key, 0)  # a resize changes an entry
        self._live[key] = nbytes
        self._peak = max(self._peak, self._current)
        self._window_peak = max(self._window_peak, self._current)

    def _release(self, key: int) -> None:
        self._current -= self._live.pop(key, 0)
        self._storages.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self._paused:
            return out
        inputs = {t.untyped_storage()._cdata for t in _tensors((args, kwargs))}
        for t in _tensors(out):
            if t.device == self.device and (self.fake or not isinstance(t, FakeTensor)):
                storage = t.untyped_storage()
                if storage._cdata not in inputs or storage._cdata in self._live:
                    self._add(storage)
        self._check_limit(func)
        return out
