"""The torch backend: pinned host tensors and non-blocking copies on two CUDA streams.

On a non-CUDA device (the emulated device) copies are synchronous and there are no streams;
compression there runs the CPU reference (:mod:`.compression`), so the planner's compressed
offloads are exercised without a GPU.
"""

from __future__ import annotations

import torch

from . import compression
from .base import TransferBackend

__all__ = ["TorchBackend"]

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class TorchBackend(TransferBackend):
    name = "torch"

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.offload_stream = torch.cuda.Stream(device)
            self.prefetch_stream = torch.cuda.Stream(device)

    @property
    def compresses(self) -> bool:
        return not self.cuda  # on CUDA, the reference's data-dependent sizes would sync

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.cuda)

    # -- the primitives a subclass replaces -------------------------------------------
    def _copy(self, dst: torch.Tensor, src: torch.Tensor, stream) -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def _record(self, stream):
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def _block(self, stream, event) -> None:
        stream.wait_event(event)

    # Note: [Cross-stream lifetimes]
    # A saved tensor is written by the compute stream and read by the offload stream, and a
    # prefetched one is written by the prefetch stream and read by the compute stream. Three
    # rules keep every byte valid (the race of torchtune issue 1867 -- NaN gradients from a
    # block freed and reused while its copy still ran -- cannot happen):
    # 1. the offload stream waits for the compute stream as it is *now* (read at each call,
    #    never cached: under FSDP2 or recompute the current stream changes) before copying;
    # 2. the source block is marked with record_stream(offload stream): the caching allocator
    #    will not hand it out again until the copy has finished, however early the forward
    #    code lets go of it -- so a device tensor is freed only after its D2H completed;
    # 3. before backward reads a prefetched block the compute stream waits for the copy's
    #    event, and the block is marked with record_stream(compute stream), so it is not
    #    reused until the compute stream is done with it.
    # The executor copies whole storages as raw bytes, so a non-contiguous saved tensor needs
    # no clone at all (and so no clone can race with the copy stream).
    def offload(self, src: torch.Tensor, dst: torch.Tensor):
        if not self.cuda:
            dst.copy_(src)
            return None
        self.offload_stream.wait_stream(torch.cuda.current_stream(self.device))  # rule 1
        self._copy(dst, src, self.offload_stream)
        src.record_stream(self.offload_stream)  # rule 2
        return self._record(self.offload_stream)

    def prefetch(self, src: torch.Tensor, after) -> tuple[torch.Tensor, object]:
        return self.prefetch_many([(src, after)])[0]

    def prefetch_many(self, items):
        if not self.cuda:
            return [(src.to(self.device, copy=True), None) for src, _ in items]
        results = []
        for src, after in items:
            with torch.cuda.stream(self.prefetch_stream):  # the block belongs to this stream
                dst = torch.empty(src.numel(), dtype=torch.uint8, device=self.device)
            if after is not None:
                self._block(self.prefetch_stream, after)  # the host bytes must be complete
            self._copy(dst, src, self.prefetch_stream)
            results.append((dst, self._record(self.prefetch_stream)))
        return results

    def consume(self, dst: torch.Tensor, event) -> None:
        if event is None:
            return
        compute = torch.cuda.current_stream(self.device)
        self._block(compute, event)  # rule 3
        dst.record_stream(compute)

    def wait(self, event) -> None:
        if event is not None:
            event.synchronize()

    def synchronize(self) -> None:
        if self.cuda:
            self.offload_stream.synchronize()
            self.prefetch_stream.synchronize()

    # -- compressed offloads: the CPU reference --------------------------------------
    def offload_compressed(self, src: torch.Tensor, dst: torch.Tensor, elem_size: int):
        with self.scratch():
            packed = compression.compress(src.view(_INT_OF_SIZE[elem_size]))
            dst[:packed.numel()].copy_(packed)
        return None

    def prefetch_compressed(self, src: torch.Tensor, nbytes: int, elem_size: int, after):
        with self.scratch():  # the kernels read the host slot where it is
            dense = compression.decompress(src, _INT_OF_SIZE[elem_size], (nbytes // elem_size,))
        return dense.view(torch.uint8).to(self.device, copy=True), None  # the device copy
