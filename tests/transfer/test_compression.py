"""The compression format's CPU reference: lossless round trips and the format's sizes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vmem.transfer import compression

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn,
          torch.float8_e5m2]


def _sparse(numel: int, density: float, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(numel, generator=g, dtype=torch.float64) + 3  # never zero
    keep = torch.rand(numel, generator=g, dtype=torch.float64) < density
    return torch.where(keep, values, torch.zeros(())).to(dtype)


@settings(max_examples=60, deadline=None)
@given(numel=st.integers(0, 20_000), density=st.floats(0.0, 1.0),
       dtype=st.sampled_from(FLOATS), seed=st.integers(0, 2**31))
def test_round_trip_is_bit_exact(numel, density, dtype, seed):
    x = _sparse(numel, density, dtype, seed)
    buf = compression.compress(x)
    y = compression.decompress(buf, dtype, x.shape)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y.view(torch.uint8), x.view(torch.uint8))
    nnz = int((x.view(torch.uint8).view(-1, x.element_size()) != 0).any(1).sum()) if numel else 0
    assert buf.numel() == compression.compressed_nbytes(numel, x.element_size(), nnz)
    assert compression.read_header(buf) == (x.element_size(), numel, nnz)


@pytest.mark.parametrize("numel", [1, 31, 32, 33, 8191, 8192, 8193, 100_003])
@pytest.mark.parametrize("density", [0.0, 1.0])
def test_extremes_and_odd_sizes(numel, density):
    x = _sparse(numel, density, torch.float32, numel)
    buf = compression.compress(x)
    assert torch.equal(compression.decompress(buf, torch.float32, (numel,)), x)
    words = (numel + 31) // 32
    mask = buf[64:64 + 4 * words]
    if density == 0.0:
        assert buf.numel() == compression.compressed_nbytes(numel, 4, 0)
        assert int(mask.sum()) == 0
    else:  # every element's bit set, none of the padding's
        bits = ((mask.view(-1, 1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)
        assert int(bits.sum()) == numel and int(bits[:numel].sum()) == numel


def test_negative_zero_and_nan_payloads_survive():
    x = torch.tensor([0.0, -0.0, float("nan"), 0.0, 1.5], dtype=torch.float32)
    y = compression.decompress(compression.compress(x), x.dtype, x.shape)
    assert torch.equal(y.view(torch.int32), x.view(torch.int32))
    assert compression.read_header(compression.compress(x))[2] == 3  # -0.0 is not all zeros


def test_layout_is_little_endian_bits_in_element_order():
    x = torch.zeros(40)
    x[[0, 3, 33]] = 1.0
    buf = compression.compress(x)
    word0 = int.from_bytes(bytes(buf[64:68].tolist()), "little")
    word1 = int.from_bytes(bytes(buf[68:72].tolist()), "little")
    assert (word0, word1) == ((1 << 0) | (1 << 3), 1 << 1)
    values = buf[80:].view(torch.float32)  # 64 + 8 mask bytes rounded up to 16
    assert values.tolist() == [1.0, 1.0, 1.0]


def test_relu_outputs_compress_and_dense_data_does_not_pay():
    x = torch.relu(torch.randn(64, 56, 56, generator=torch.Generator().manual_seed(0)))
    d = compression.density(x)
    assert 0.45 < d < 0.55  # half of a symmetric distribution is negative
    assert compression.pays(x.numel(), 4, d)
    assert x.numel() * 4 / compression.compress(x).numel() > 1.8
    assert not compression.pays(x.numel(), 4, 0.9)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="complex64"):
        compression.compress(torch.zeros(4, dtype=torch.complex64))
    with pytest.raises(ValueError, match="not a vmem compressed buffer"):
        compression.read_header(torch.zeros(64, dtype=torch.uint8))
    buf = compression.compress(torch.ones(10))
    with pytest.raises(ValueError, match="10 elements of 4 bytes"):
        compression.decompress(buf, torch.float64, (10,))
