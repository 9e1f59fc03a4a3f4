"""Two of the three memory pools (HMMS); the third, the resident pool, is PyTorch's allocator.

- :class:`HostPool`: pinned host memory allocated once and reused every step. Offloads take
  consecutive slices in forward order; when every slice of a step has been given back (the
  graph is freed after backward) the next step starts again at the front. A step that does
  not fit (two graphs alive at once, a larger input) gets a separate buffer, counted in the
  statistics, as long as the total stays within the host budget.
- :class:`StagingPool`: accounts for the device bytes fetched back ahead of backward and
  bounds them: a prefetch that would exceed the bound waits until backward needs it.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable

import torch

__all__ = ["HostPool", "StagingPool"]

_ALIGN = 512  # bytes: slices start on this boundary, as cudaHostAlloc's own blocks do


def _aligned(nbytes: int) -> int:
    return (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclasses.dataclass
class HostPoolStats:
    capacity: int = 0  # bytes of the arena
    in_use: int = 0
    peak_in_use: int = 0
    arena_allocations: int = 0  # times the arena was (re)allocated
    overflow_allocations: int = 0  # buffers allocated beside the arena
    slices: int = 0  # slices handed out in all


class HostPool:
    """Pinned host memory for offloaded storages, reused across steps."""

    def __init__(self, allocate: Callable[[int], torch.Tensor], limit: int | None = None) -> None:
        self.allocate, self.limit = allocate, limit  # allocate: a backend's host_buffer
        self.arena: torch.Tensor | None = None
        self.offset = 0  # first free byte of the arena
        self.live = 0  # arena slices not given back yet
        self.overflow = 0  # bytes of live buffers beside the arena
        self.stats = HostPoolStats()

    def reserve(self, nbytes: int, slices: int = 0) -> None:
        """Make the arena hold at least ``nbytes`` (one step's offloads) in ``slices`` slices
        (each rounded up to the alignment) when next empty."""
        nbytes = _aligned(nbytes) + slices * _ALIGN
        nbytes = min(nbytes, self.limit or nbytes)
        if (self.arena is None or nbytes > self.stats.capacity) and self.live == 0 and nbytes:
            self.arena = None  # let the old arena go before pinning the new one
            self.arena = self.allocate(nbytes)
            self.offset = 0
            self.stats.capacity = nbytes
            self.stats.arena_allocations += 1

    def take(self, nbytes: int) -> tuple[torch.Tensor, Callable[[], None]] | None:
        """A host slice of ``nbytes`` and the function that gives it back; None when the host
        budget is spent."""
        size = _aligned(nbytes)
        if self.arena is not None and self.offset + size <= self.arena.numel():
            start, self.offset = self.offset, self.offset + size
            self.live += 1
            self._count(size, 1)
            return self.arena[start:start + nbytes], lambda: self._give_back_slice(size)
        if self.limit is not None and self.stats.capacity + self.overflow + size > self.limit:
            return None
        self.stats.overflow_allocations += 1
        self.overflow += size
        self._count(size, 1)
        return self.allocate(nbytes), lambda: self._give_back_overflow(size)

    def _give_back_overflow(self, size: int) -> None:
        self.overflow -= size
        self._count(-size, 0)

    def _give_back_slice(self, size: int) -> None:
        self.live -= 1
        self._count(-size, 0)
        if self.live == 0:
            self.offset = 0

    def _count(self, nbytes: int, slices: int) -> None:
        self.stats.in_use += nbytes
        self.stats.peak_in_use = max(self.stats.peak_in_use, self.stats.in_use)
        self.stats.slices += slices

    def release(self) -> None:
        """Drop the arena (slices still referenced stay valid until they are freed)."""
        self.arena = None


@dataclasses.dataclass
class StagingStats:
    capacity: int | None = None  # bound on fetched-back bytes; None: unbounded
    in_use: int = 0
    peak_in_use: int = 0
    prefetched: int = 0  # storages fetched back ahead of their use
    on_demand: int = 0  # storages fetched back only when backward needed them


class StagingPool:
    """Device bytes fetched back and not yet freed, bounded by the plan."""

    def __init__(self, capacity: int | None = None) -> None:
        self.stats = StagingStats(capacity=capacity)

    def admits(self, nbytes: int) -> bool:
        return self.stats.capacity is None or self.stats.in_use + nbytes <= self.stats.capacity

    def track(self, tensor: torch.Tensor, ahead: bool) -> None:
        """Count ``tensor``'s bytes until its storage is freed."""
        nbytes = tensor.untyped_storage().nbytes()
        self.stats.in_use += nbytes
        self.stats.peak_in_use = max(self.stats.peak_in_use, self.stats.in_use)
        if ahead:
            self.stats.prefetched += 1
        else:
            self.stats.on_demand += 1
        weakref.finalize(tensor.untyped_storage(), self._freed, nbytes)

    def _freed(self, nbytes: int) -> None:
        self.stats.in_use -= nbytes
