"""Streaming a split run's input through the host pool.

A split run needs its input again in backward, one part (with its halo rows) at a time.
Instead of keeping the whole input on the device, or fetching it back whole, the run gives it
to a *stash*: its bytes go to a host-pool slice in forward (on the offload stream), the device
copy is freed as soon as the forward code lets go of it, and backward copies back only the
rows each part reads. An input without a ``grad_fn`` (the model's input, which the caller
holds anyway) stays where it is: moving it would free nothing.

:class:`HostStash` is the session's; :class:`ShapeStash` is what the planner profiles with:
the same device-memory behaviour on the ``meta`` device, moving no data.
"""

from __future__ import annotations

import logging

import torch

from ..transfer import TransferBackend
from .pools import HostPool
from .split import Held

__all__ = ["HostStash", "ShapeStash"]

log = logging.getLogger("vmem")


def _moves(x: torch.Tensor) -> bool:
    return x.grad_fn is not None


class _Streamed:
    """A run input in a host-pool slice; each ``rows`` is a fresh device copy."""

    def __init__(self, host: torch.Tensor, give_back, event, backend: TransferBackend,
                 device: torch.device) -> None:
        self.host, self.give_back, self.event = host, give_back, event
        self.backend, self.device = backend, device

    def rows(self, axis: int, start: int, stop: int) -> torch.Tensor:
        if self.event is not None:  # the copy out must be complete before we read it
            self.backend.wait(self.event)
            self.event = None
        part = self.host.narrow(axis, start, stop - start)
        out = torch.empty(part.shape, dtype=part.dtype, device=self.device)
        out.copy_(part, non_blocking=True)
        return out

    def __del__(self) -> None:
        self.give_back()


class HostStash:
    """Moves split-run inputs to the host pool, over the backend's offload stream."""

    def __init__(self, backend: TransferBackend, host_pool: HostPool,
                 device: torch.device) -> None:
        self.backend, self.host_pool, self.device = backend, host_pool, device
        self.warned = False

    def __call__(self, x: torch.Tensor):
        if not _moves(x) or x.device != self.device:
            return Held(x)
        slot = self.host_pool.take(x.numel() * x.element_size())
        if slot is None:  # the host budget is spent
            if not self.warned:
                log.warning("vmem: the host budget is spent; a split run's input stays on "
                            "the device (raise VMEM_HOST_BUDGET)")
                self.warned = True
            return Held(x)
        x = x.contiguous()  # channels_last and the like: the copy out needs plain bytes
        host_bytes, give_back = slot
        event = self.backend.offload(x.reshape(-1).view(torch.uint8), host_bytes)
        host = host_bytes.view(x.dtype).view(x.shape)
        return _Streamed(host, give_back, event, self.backend, self.device)


class _Shape:
    def __init__(self, x: torch.Tensor) -> None:
        self.dtype, self.device, self.shape = x.dtype, x.device, x.shape

    def rows(self, axis: int, start: int, stop: int) -> torch.Tensor:
        shape = list(self.shape)
        shape[axis] = stop - start
        return torch.empty(shape, dtype=self.dtype, device=self.device)


class ShapeStash:
    """Profiling's stash: the input leaves the device; each part comes back as new memory."""

    def __call__(self, x: torch.Tensor):
        return _Shape(x) if _moves(x) else Held(x)
