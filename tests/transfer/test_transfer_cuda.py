"""On a real GPU: every backend's round trip is bit-identical, and the compression kernels
write exactly the CPU reference's bytes."""

import pytest
import torch

from vmem.transfer import backends, compression, make_backend, native

pytestmark = pytest.mark.gpu


@pytest.fixture
def library():
    try:
        return native.load()
    except native.NativeError as error:
        pytest.skip(f"native library unavailable: {error}")

SIZES = [0, 1, 31, 33, 8191, 8193, 1_000_003]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn]


def _sparse(numel, density, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(numel, generator=g) + 3
    keep = torch.rand(numel, generator=g) < density
    return torch.where(keep, values, torch.zeros(())).to(dtype)


@pytest.mark.parametrize("name", ["native", "cupy", "torch"])
def test_round_trip_is_bit_identical(name):
    if name not in backends():
        pytest.skip(f"{name} backend unavailable here")
    device = torch.device("cuda")
    backend = make_backend(name, device)
    sources = [torch.randint(0, 256, (n,), dtype=torch.uint8, device=device)
               for n in (1, 4097, 3 << 20)]
    hosts = [backend.host_buffer(s.numel()) for s in sources]
    events = [backend.offload(s, h) for s, h in zip(sources, hosts, strict=True)]
    fetched = backend.prefetch_many(list(zip(hosts, events, strict=True)))
    for (dst, event), src in zip(fetched, sources, strict=True):
        backend.consume(dst, event)
        assert torch.equal(dst, src)
    backend.synchronize()


@pytest.mark.parametrize("dtype, density, numel", [
    *[(dtype, density, numel) for dtype in DTYPES for density in (0.0, 0.3, 1.0)
      for numel in SIZES],
    (torch.float32, 0.3, 9_000_001),  # over 1024 chunks: each scan thread takes several
])
def test_kernels_match_the_reference(library, dtype, density, numel):
    x = _sparse(numel, density, dtype, seed=numel)
    reference = compression.compress(x)
    src = x.cuda()
    bound = compression.compressed_nbytes(numel, x.element_size(), numel)
    out = torch.full((bound,), 0xAB, dtype=torch.uint8, device="cuda")
    workspace = torch.empty(library.compress_workspace_bytes(numel), dtype=torch.uint8,
                            device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    library.compress(src.data_ptr(), numel, x.element_size(), out.data_ptr(),
                     workspace.data_ptr(), stream)
    # The header's padding, the mask's padding and the values are all defined bytes.
    assert torch.equal(out[:reference.numel()].cpu(), reference)
    assert bool((out[reference.numel():] == 0xAB).all())  # nothing written past its end
    dense = torch.full_like(src, 7)
    library.decompress(out.data_ptr(), numel, x.element_size(), dense.data_ptr(),
                       workspace.data_ptr(), stream)
    assert torch.equal(dense.cpu().view(torch.uint8), x.view(torch.uint8))


def test_compressed_offload_through_pinned_host_memory(library):
    backend = make_backend("native", torch.device("cuda"))
    x = torch.relu(torch.randn(64, 128, 28, 28, device="cuda"))
    src = x.reshape(-1).view(torch.uint8)
    slot = backend.host_buffer(compression.compressed_nbytes(x.numel(), 4, x.numel()))
    assert slot.is_pinned()
    event = backend.offload_compressed(src, slot, 4)
    dense, done = backend.prefetch_compressed(slot, src.numel(), 4, event)
    backend.consume(dense, done)
    assert torch.equal(dense, src)
    _, numel, nnz = compression.read_header(slot[:64])
    assert numel == x.numel() and nnz == int((x != 0).sum())
