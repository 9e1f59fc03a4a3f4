"""Split runs streaming their input through the host pool."""

import torch
from torch import nn

from vmem.feedforward.pools import HostPool
from vmem.feedforward.split import split_forward
from vmem.feedforward.stream import HostStash, ShapeStash
from vmem.meter import EmulatedMeter
from vmem.transfer import make_backend


def _chain() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())


def test_streamed_input_gives_the_same_gradients_and_goes_back_to_the_pool():
    cpu = torch.device("cpu")
    pool = HostPool(lambda n: torch.empty(n, dtype=torch.uint8))
    stash = HostStash(make_backend("torch", cpu), pool, cpu)
    chain, twin = _chain(), _chain()
    x = torch.randn(2, 8, 24, 24, requires_grad=True)
    grads = []
    for layers, how in ((chain, None), (twin, stash)):
        h = x * 1.0  # a layer's output (it has a grad_fn), as inside a model
        out = split_forward(layers, h, parts=3, axis=2, stash=how)
        if how is not None:
            assert pool.stats.in_use == h.numel() * 4  # the input is in the pool
        out.backward(torch.ones_like(out))
        grads.append([x.grad.clone(), *(p.grad for p in layers.parameters())])
        x.grad = None
        del out
    assert pool.stats.in_use == 0 and pool.stats.slices == 1  # given back with the graph
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_a_leaf_input_is_not_moved():
    pool = HostPool(lambda n: torch.empty(n, dtype=torch.uint8))
    stash = HostStash(make_backend("torch", torch.device("cpu")), pool, torch.device("cpu"))
    split_forward(_chain(), torch.randn(2, 8, 16, 16), parts=2, stash=stash)
    assert pool.stats.slices == 0


def test_streaming_lowers_the_peak_and_the_profile_stash_predicts_it():
    def peak(streaming: str, device: str = "cpu") -> int:
        chain = _chain().to(device)
        x = torch.empty(4, 8, 64, 64, device=device).normal_() if device == "cpu" else \
            torch.empty(4, 8, 64, 64, device=device)
        meter = EmulatedMeter(torch.device(device))

        def host_buffer(nbytes):  # host memory: not the device's (as the session does)
            with meter.paused():
                buffer = torch.empty(nbytes, dtype=torch.uint8)
            meter.exclude(buffer)
            return buffer

        cpu = torch.device("cpu")
        stash = {"none": None, "host": HostStash(make_backend("torch", cpu),
                                                 HostPool(host_buffer), cpu),
                 "shape": ShapeStash()}[streaming]
        with meter:
            meter.track([*chain.parameters(), *chain.buffers(), x])
            h = x.requires_grad_() * 2.0  # a layer's output that nothing else saves
            out = split_forward(chain, h, parts=4, stash=stash)
            del h
            out.sum().backward()
            del out
        return meter.peak

    streamed = peak("host")
    assert streamed < peak("none")
    assert peak("shape", "meta") == streamed
