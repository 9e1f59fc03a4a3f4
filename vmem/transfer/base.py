"""The interface every transfer backend implements for the executor."""

from __future__ import annotations

import abc

import torch

__all__ = ["TransferBackend"]


class TransferBackend(abc.ABC):
    """Moves raw bytes (``uint8`` tensors) between the device and host memory.

    Completion is signalled with an opaque event (``None`` where copies are synchronous);
    the backend owns its offload and prefetch streams and reads the compute stream anew on
    every call, never caching it.
    """

    name: str

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @abc.abstractmethod
    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """A host ``uint8`` buffer that copies can use asynchronously (pinned on CUDA)."""

    @abc.abstractmethod
    def offload(self, src: torch.Tensor, dst: torch.Tensor):
        """Start copying device bytes ``src`` to host bytes ``dst``; returns its event."""

    @abc.abstractmethod
    def prefetch(self, src: torch.Tensor, after) -> tuple[torch.Tensor, object]:
        """Start copying host bytes ``src`` to new device bytes, once event ``after`` is
        complete; returns the device tensor and the copy's event."""

    @abc.abstractmethod
    def consume(self, dst: torch.Tensor, event) -> None:
        """Make the compute stream wait for ``event`` before it reads ``dst``."""

    @abc.abstractmethod
    def wait(self, event) -> None:
        """Block the host until ``event`` is complete."""

    @abc.abstractmethod
    def synchronize(self) -> None:
        """Block the host until every copy issued so far is complete."""
