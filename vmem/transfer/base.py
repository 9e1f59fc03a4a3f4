"""The interface every transfer backend implements for the executor."""

from __future__ import annotations

import abc
import contextlib

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
        # The context the backend makes its scratch tensors in (the CPU reference's, on the
        # emulated device): the session pauses the emulated meter there, as the kernels'
        # workspace on a GPU is a few percent of a tensor.
        self.scratch = contextlib.nullcontext

    @property
    def compresses(self) -> bool:
        """Whether :meth:`offload_compressed` and :meth:`prefetch_compressed` work here."""
        return False

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

    def prefetch_many(self, items: list[tuple[torch.Tensor, object]]
                      ) -> list[tuple[torch.Tensor, object]]:
        """:meth:`prefetch` of each ``(src, after)``, in order, in as few calls as the
        backend can."""
        return [self.prefetch(src, after) for src, after in items]

    @abc.abstractmethod
    def consume(self, dst: torch.Tensor, event) -> None:
        """Make the compute stream wait for ``event`` before it reads ``dst``."""

    @abc.abstractmethod
    def wait(self, event) -> None:
        """Block the host until ``event`` is complete."""

    @abc.abstractmethod
    def synchronize(self) -> None:
        """Block the host until every copy issued so far is complete."""

    def release(self) -> None:  # noqa: B027 -- most backends hold nothing to give back
        """Give back the host memory nothing uses any more (the session is over)."""

    def offload_compressed(self, src: torch.Tensor, dst: torch.Tensor, elem_size: int):
        """Like :meth:`offload`, but ``dst`` receives ``src`` (elements of ``elem_size``
        bytes) in :mod:`vmem.transfer.compression`'s format; ``dst`` holds at least
        ``compressed_nbytes(n, elem_size, n)`` bytes."""
        raise NotImplementedError(f"the {self.name} backend does not compress")

    def prefetch_compressed(self, src: torch.Tensor, nbytes: int, elem_size: int, after
                            ) -> tuple[torch.Tensor, object]:
        """Like :meth:`prefetch` for a buffer :meth:`offload_compressed` wrote, of ``nbytes``
        uncompressed: returns the decompressed device bytes and their event; the device holds
        nothing else of it (no compressed copy)."""
        raise NotImplementedError(f"the {self.name} backend does not compress")
