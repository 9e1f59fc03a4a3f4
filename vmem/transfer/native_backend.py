"""The native backend: the csrc library's pinned arena, copies, events and compression.

What it adds to the torch backend: host memory comes from a few large pinned blocks (torch's
pinned allocator rounds every request up to a power of two, so a 5 GiB host pool would pin
8 GiB); a segment's prefetches go out as one batched call; and mostly-zero activations cross
the link compressed (:mod:`.compression`). The compress kernels write straight into the
mapped pinned slice and the decompress kernels read it there, so only the header, mask and
non-zeros cross the link, the device never holds a compressed copy, and the host never needs
the compressed size. On a non-CUDA device the arena hands out plain host
memory and compression runs the CPU reference, so the emulated device exercises this backend.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from . import native
from .torch_backend import TorchBackend

__all__ = ["NativeBackend"]


class NativeBackend(TorchBackend):
    name = "native"

    def __init__(self, device: torch.device, library: native.NativeLibrary | None = None) -> None:
        self.library = library or native.load()
        if device.type == "cuda":
            count, why = self.library.device_count()
            if count == 0:
                raise native.NativeError(f"the native library sees no CUDA device ({why})")
        super().__init__(device)
        self.arena = native.Arena(self.library, pinned=self.cuda)
        if self.cuda:  # the library's runtime uses the thread's current device: make it ours
            index = device.index if device.index is not None else torch.cuda.current_device()
            self._on_device = functools.partial(torch.cuda.device, index)
        else:
            self._on_device = contextlib.nullcontext

    @property
    def compresses(self) -> bool:
        return True

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        # Unlike torch's pinned allocator, the arena reuses freed bytes at once, without
        # waiting for copies still reading or writing them: the executor's rules keep that
        # safe (a slice goes back only once its copies are done; see _Stored.__del__).
        return self.arena.tensor(nbytes)

    def release(self) -> None:
        self.arena.trim()  # blocks still holding a live graph's slices stay

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, stream) -> None:
        with self._on_device():
            self.library.copy(dst.data_ptr(), src.data_ptr(), src.numel(), stream.cuda_stream)

    def _record(self, stream) -> native.Event:
        with self._on_device():  # an event belongs to the device current at its creation
            event = native.Event(self.library)
            event.record(stream.cuda_stream)
        return event

    def _block(self, stream, event) -> None:
        with self._on_device():
            event.block(stream.cuda_stream)

    def prefetch_many(self, items):
        if not self.cuda or len(items) < 2:
            return super().prefetch_many(items)
        stream = self.prefetch_stream
        with torch.cuda.stream(stream):  # the blocks belong to the prefetch stream
            dsts = [torch.empty(src.numel(), dtype=torch.uint8, device=self.device)
                    for src, _ in items]
        for _, after in items:
            if after is not None:
                self._block(stream, after)  # the host bytes must be complete
        with self._on_device():
            self.library.copy_batch([d.data_ptr() for d in dsts],
                                    [src.data_ptr() for src, _ in items],
                                    [src.numel() for src, _ in items], stream.cuda_stream)
        done = self._record(stream)  # one event for the batch
        return [(dst, done) for dst in dsts]

    def _workspace(self, numel: int) -> torch.Tensor:
        # Allocated on the current stream and freed right after the launch: the caching
        # allocator hands the block out again only to later work on the same stream.
        return torch.empty(self.library.compress_workspace_bytes(numel), dtype=torch.uint8,
                           device=self.device)

    def offload_compressed(self, src: torch.Tensor, dst: torch.Tensor, elem_size: int):
        if not self.cuda:
            return super().offload_compressed(src, dst, elem_size)
        stream = self.offload_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))  # rule 1 of the Note
        numel = src.numel() // elem_size
        with torch.cuda.stream(stream):
            workspace = self._workspace(numel)
        with self._on_device():
            self.library.compress(src.data_ptr(), numel, elem_size, dst.data_ptr(),
                                  workspace.data_ptr(), stream.cuda_stream)
        src.record_stream(stream)  # rule 2
        return self._record(stream)

    def prefetch_compressed(self, src: torch.Tensor, nbytes: int, elem_size: int, after):
        if not self.cuda:
            return super().prefetch_compressed(src, nbytes, elem_size, after)
        # The kernels read the mask and the non-zeros straight from the mapped host slot: no
        # compressed copy on the device, and the host never waits for the copy out (the
        # prefetch stream does).
        stream, numel = self.prefetch_stream, nbytes // elem_size
        with torch.cuda.stream(stream):
            dense = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            workspace = torch.empty(self.library.decompress_workspace_bytes(numel),
                                    dtype=torch.uint8, device=self.device)
        if after is not None:
            self._block(stream, after)  # the host slot must be complete
        with self._on_device():
            self.library.decompress(src.data_ptr(), numel, elem_size, dense.data_ptr(),
                                    workspace.data_ptr(), stream.cuda_stream)
        return dense, self._record(stream)
