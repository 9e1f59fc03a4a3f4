"""The torch backend: pinned host tensors and non-blocking copies on two CUDA streams.

On a non-CUDA device (the emulated device) copies are synchronous and there are no streams.
"""

from __future__ import annotations

import torch

from .base import TransferBackend

__all__ = ["TorchBackend"]


class TorchBackend(TransferBackend):
    name = "torch"

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.offload_stream = torch.cuda.Stream(device)
            self.prefetch_stream = torch.cuda.Stream(device)

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.cuda)

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
        with torch.cuda.stream(self.offload_stream):
            dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        src.record_stream(self.offload_stream)  # rule 2
        return done

    def prefetch(self, src: torch.Tensor, after) -> tuple[torch.Tensor, object]:
        if not self.cuda:
            return src.to(self.device, copy=True), None
        with torch.cuda.stream(self.prefetch_stream):
            if after is not None:
                self.prefetch_stream.wait_event(after)  # the host bytes must be complete
            dst = torch.empty(src.numel(), dtype=torch.uint8, device=self.device)
            dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        return dst, done

    def consume(self, dst: torch.Tensor, event) -> None:
        if event is None:
            return
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(event)  # rule 3
        dst.record_stream(compute)

    def wait(self, event) -> None:
        if event is not None:
            event.synchronize()

    def synchronize(self) -> None:
        if self.cuda:
            self.offload_stream.synchronize()
            self.prefetch_stream.synchronize()
