"""Choosing a backend, and the native backend on the emulated device (its arena serves the
host pool, compression runs the CPU reference)."""

import logging

import pytest
import torch
from nets import SHAPE, build

import vmem
from vmem import transfer
from vmem.transfer import compression, make_backend, native

CPU = torch.device("cpu")


def _native_loads() -> bool:
    try:
        native.load()
    except native.NativeError:
        return False
    return True


needs_native = pytest.mark.skipif(not _native_loads(), reason="native library unavailable")


def test_backends_lists_what_loads_best_first():
    names = transfer.backends()
    assert names[-1] == "torch"
    assert ("native" in names) == _native_loads()
    assert names == [n for n in ("native", "cupy", "torch") if n in names]


def test_unknown_or_unavailable_backend_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="VMEM_BACKEND"):
        make_backend("nccl", CPU)
    monkeypatch.setattr(transfer, "_unavailable",
                        lambda name: "nvcc not found" if name == "native" else None)
    with pytest.raises(RuntimeError, match="'native' is not available here: nvcc not found"):
        make_backend("native", CPU)


def test_auto_falls_back_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(transfer, "_unavailable",
                        lambda name: "nvcc not found" if name == "native" else None)
    monkeypatch.setattr(transfer, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="vmem"):
        first = make_backend("auto", CPU)
        second = make_backend("auto", CPU)
    assert first.name == second.name == "torch"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "native: nvcc not found" in warnings[0]


@needs_native
def test_native_backend_on_the_emulated_device():
    backend = make_backend("native", CPU)
    assert backend.name == "native" and backend.compresses
    host = backend.host_buffer(4096)
    assert backend.arena.stats()["in_use"] == 4096
    x = torch.relu(torch.randn(1000))
    src = x.view(torch.uint8)
    assert backend.offload(src, host[:4000]) is None
    fetched, _ = backend.prefetch_many([(host[:4000], None)])[0]
    assert torch.equal(fetched, src)
    slot = backend.host_buffer(compression.compressed_nbytes(1000, 4, 1000))
    backend.offload_compressed(src, slot, 4)
    dense, _ = backend.prefetch_compressed(slot, 4000, 4, None)
    assert torch.equal(dense, src)


@needs_native
def test_session_with_the_native_backend_gives_identical_gradients():
    x = torch.randn(SHAPE)
    plain, offloaded = build("resnet"), build("resnet")
    plain(x).sum().backward()
    with vmem.session(offloaded, policy="vdnn_all", backend="native") as s:
        offloaded(x).sum().backward()
    assert s.backend.name == "native" and s.backend.arena.stats()["allocations"] > 0
    for p, q in zip(plain.parameters(), offloaded.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
