"""The native library on this machine: it compiles, loads, reports a missing CUDA device
cleanly, and its host arena allocates, reuses, coalesces and trims (with plain host memory,
so it runs without a GPU)."""

import gc

import pytest
import torch

from vmem.transfer import native

needs_nvcc = pytest.mark.skipif(native._nvcc() is None, reason="nvcc not found")


@pytest.fixture(scope="module")
def library():
    try:
        return native.load()
    except native.NativeError as error:
        pytest.skip(f"native library unavailable: {error}")


@needs_nvcc
def test_compiles_and_loads_from_a_clean_cache(tmp_path):
    path = native.build(tmp_path)
    assert path.parent == tmp_path and path.is_file()
    assert native.build(tmp_path) == path  # the second call finds it in the cache
    library = native.NativeLibrary(path)
    count, why = library.device_count()
    if torch.cuda.is_available():
        assert count == torch.cuda.device_count() and why is None
    else:
        assert count == 0 and why  # e.g. "cudaErrorNoDevice: no CUDA-capable device ..."
        assert "no CUDA device" in native.status()


def test_a_failed_build_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "_nvcc", lambda: None)
    with pytest.raises(native.NativeError, match="nvcc not found"):
        native.build(tmp_path)


def test_arena_reuses_coalesces_and_trims(library):
    arena = native.Arena(library, block_bytes=1 << 20, pinned=False)
    a, b, c = (arena.alloc(1000) for _ in range(3))
    assert (b - a, c - b) == (1024, 1024)  # 512-byte aligned, consecutive
    stats = arena.stats()
    assert stats["blocks"] == 1 and stats["in_use"] == 3072 and stats["reuses"] == 2
    arena.free(a)
    arena.free(b)  # coalesces with a's range
    assert arena.alloc(2048) == a  # the coalesced range serves a larger request
    big = arena.alloc(3 << 20)  # larger than a block: a block of its own
    assert arena.stats()["blocks"] == 2
    arena.free(big)
    arena.trim()  # gives back the empty block, keeps the one in use
    stats = arena.stats()
    assert stats["blocks"] == 1 and stats["reserved"] == 1 << 20
    assert stats["peak_in_use"] == 1024 + 2048 + (3 << 20)  # c, the coalesced range, big


def test_arena_best_fit_never_joins_two_blocks(library):
    arena = native.Arena(library, block_bytes=4096, pinned=False)
    ptrs = [arena.alloc(4096) for _ in range(4)]  # four full blocks
    for ptr in ptrs:
        arena.free(ptr)
    arena.alloc(4096)
    assert arena.stats()["blocks"] == 4  # a free block was reused, none added
    with pytest.raises(native.NativeError, match="cudaErrorInvalidValue"):
        arena.free(12345)  # not an allocation of this arena


def test_arena_tensors_give_their_bytes_back(library):
    arena = native.Arena(library, block_bytes=1 << 20, pinned=False)
    t = arena.tensor(5000)
    t.fill_(7)
    view = t[100:200]
    del t
    gc.collect()
    assert arena.stats()["in_use"] == 5120  # the view still holds the bytes
    assert int(view.sum()) == 700
    del view
    gc.collect()
    assert arena.stats()["in_use"] == 0 and arena.stats()["frees"] == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-device error")
def test_pinned_memory_without_a_device_is_a_clean_error(library):
    arena = native.Arena(library, pinned=True)
    with pytest.raises(native.NativeError, match="pinned host memory: cuda"):
        arena.alloc(1 << 20)
