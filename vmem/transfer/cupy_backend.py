"""The cupy backend: cupy's runtime API for copies and events, its pinned memory pool for host
buffers. The second choice, where the native library cannot be built (no ``nvcc``) but cupy
is installed: its pinned pool reuses freed host buffers across steps."""

from __future__ import annotations

import torch

from .torch_backend import TorchBackend

__all__ = ["CupyBackend"]


class CupyBackend(TorchBackend):
    name = "cupy"

    def __init__(self, device: torch.device) -> None:
        import cupy  # imported here: importing vmem never needs it

        if device.type != "cuda":
            raise RuntimeError(f"the cupy backend needs a CUDA device, not {device}")
        super().__init__(device)
        self.cupy = cupy
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self.pinned_pool = cupy.cuda.PinnedMemoryPool()

    @property
    def compresses(self) -> bool:
        return False

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        memory = self.pinned_pool.malloc(max(nbytes, 1))  # back to the pool when freed
        return torch.frombuffer(memory, dtype=torch.uint8, count=max(nbytes, 1))[:nbytes]

    def _stream(self, stream):
        return self.cupy.cuda.ExternalStream(stream.cuda_stream, self.index)

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, stream) -> None:
        runtime = self.cupy.cuda.runtime
        runtime.memcpyAsync(dst.data_ptr(), src.data_ptr(), src.numel(),
                            runtime.memcpyDefault, stream.cuda_stream)

    def _record(self, stream):
        event = self.cupy.cuda.Event(disable_timing=True)
        event.record(self._stream(stream))
        return event

    def _block(self, stream, event) -> None:
        self._stream(stream).wait_event(event)
