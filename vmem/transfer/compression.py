"""Zero-value compression of offloaded activations (cDMA, Rhu et al. 2018): the format and its
CPU reference implementation.

ReLU outputs are mostly zeros. A compressed buffer keeps one bit per element (set where the
element's bits are not all zero: ``-0.0`` and NaN payloads survive) and the non-zero elements
packed in order, so it is lossless for every dtype. Layout, little-endian::

    offset 0    header, 64 bytes: u32 magic "VMZC", u32 version (1), u32 element size,
                u32 zero, u64 element count n, u64 non-zero count nnz, 32 zero bytes
    offset 64   mask: ceil(n / 32) u32 words; bit l of word w is element 32 w + l
    offset V    values: nnz elements, V = 64 + the mask's bytes rounded up to 16

The CUDA kernels in ``csrc/vmem_native.cu`` write and read exactly these bytes; this module
is the reference they are tested against, and what the emulated device uses. Compression pays
only below a density: :func:`pays` is the planner's test.

Example::

    >>> import torch
    >>> from vmem.transfer import compression
    >>> x = torch.relu(torch.tensor([-1.0, 2.0, -3.0, 4.0]))
    >>> buf = compression.compress(x)
    >>> torch.equal(compression.decompress(buf, x.dtype, x.shape), x)
    True
"""

from __future__ import annotations

import struct

import torch

__all__ = ["HEADER_BYTES", "MAGIC", "VERSION", "compress", "compressed_nbytes", "count_nonzero",
           "decompress", "density", "pays", "read_header"]

HEADER_BYTES = 64
MAGIC = 0x435A4D56  # b"VMZC" read as a little-endian u32
VERSION = 1
_HEADER = struct.Struct("<IIIIQQ")
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # same-size ints
_BIT_WEIGHTS = torch.tensor([1 << b for b in range(8)], dtype=torch.int32)
# Compression must cut the bytes by this factor to be planned: below it the kernels' time
# and the worst-case host slot are not worth the saved link time.
MIN_RATIO = 1.25


def _mask_bytes(numel: int) -> int:
    return (numel + 31) // 32 * 4


def _values_offset(numel: int) -> int:
    return HEADER_BYTES + (_mask_bytes(numel) + 15) // 16 * 16


def compressed_nbytes(numel: int, elem_size: int, nnz: int) -> int:
    """Bytes of a compressed buffer; with ``nnz = numel``, the most it can take."""
    return _values_offset(numel) + nnz * elem_size


_CHUNK = 1 << 22  # elements counted at a time: a bounded temporary (4 MiB of bools)


def count_nonzero(t: torch.Tensor) -> torch.Tensor:
    """How many of contiguous ``t``'s elements have bits that are not all zero, as a tensor on
    ``t``'s device (nothing waits for it), counted in chunks so that no temporary near
    ``t``'s size is made."""
    bits = _BITS.get(t.element_size())
    if bits is None or t.is_complex() or not t.is_contiguous():
        raise ValueError(f"cannot count a {'non-contiguous ' if bits else ''}{t.dtype} "
                         "tensor's non-zero bit patterns (contiguous 1, 2, 4 or 8-byte real "
                         "dtypes)")
    flat = t.detach().reshape(-1).view(bits)
    total = torch.zeros((), dtype=torch.int64, device=t.device)
    for start in range(0, flat.numel(), _CHUNK):
        total += torch.count_nonzero(flat[start:start + _CHUNK])
    return total


def density(t: torch.Tensor) -> float:
    """The fraction of ``t``'s elements whose bits are not all zero."""
    if t.numel() == 0:
        return 0.0
    return count_nonzero(t.contiguous()).item() / t.numel()


def pays(numel: int, elem_size: int, density: float) -> bool:
    """Whether compressing ``numel`` elements at ``density`` cuts the bytes by MIN_RATIO."""
    nnz = round(density * numel)
    return numel * elem_size >= MIN_RATIO * compressed_nbytes(numel, elem_size, nnz)


def _nonzero(t: torch.Tensor) -> torch.Tensor:
    bits = _BITS.get(t.element_size())
    if bits is None or t.is_complex():
        raise ValueError(f"cannot compress a {t.dtype} tensor: elements of "
                         f"{t.element_size()} bytes (supported: 1, 2, 4 and 8-byte real dtypes)")
    return t.detach().contiguous().reshape(-1).view(bits) != 0


def compress(t: torch.Tensor) -> torch.Tensor:
    """``t``'s elements compressed: a ``uint8`` tensor on ``t``'s device, in the format above."""
    numel, elem_size = t.numel(), t.element_size()
    nonzero = _nonzero(t)
    nnz = int(nonzero.sum())
    padded = torch.zeros(_mask_bytes(numel) * 8, dtype=torch.int32, device=t.device)
    padded[:numel] = nonzero
    mask = (padded.view(-1, 8) * _BIT_WEIGHTS.to(t.device)).sum(1).to(torch.uint8)
    out = torch.zeros(compressed_nbytes(numel, elem_size, nnz), dtype=torch.uint8,
                      device=t.device)
    header = _HEADER.pack(MAGIC, VERSION, elem_size, 0, numel, nnz)
    out[:len(header)] = torch.frombuffer(bytearray(header), dtype=torch.uint8).to(t.device)
    out[HEADER_BYTES:HEADER_BYTES + mask.numel()] = mask
    values = t.detach().contiguous().reshape(-1).view(torch.uint8).view(-1, elem_size)[nonzero]
    out[_values_offset(numel):] = values.reshape(-1)
    return out


def read_header(buf: torch.Tensor) -> tuple[int, int, int]:
    """``(element size, element count, non-zero count)`` of a compressed buffer."""
    magic, version, elem_size, _, numel, nnz = _HEADER.unpack(
        bytes(buf[:_HEADER.size].cpu().tolist()))
    if magic != MAGIC or version != VERSION:
        raise ValueError(f"not a vmem compressed buffer (magic {magic:#x}, version {version}; "
                         f"expected {MAGIC:#x}, {VERSION})")
    return elem_size, numel, nnz


def decompress(buf: torch.Tensor, dtype: torch.dtype, shape) -> torch.Tensor:
    """The tensor of ``dtype`` and ``shape`` that :func:`compress` turned into ``buf``."""
    elem_size, numel, nnz = read_header(buf)
    out = torch.empty(shape, dtype=dtype, device=buf.device)
    if out.numel() != numel or out.element_size() != elem_size:
        raise ValueError(f"the buffer holds {numel} elements of {elem_size} bytes, not a "
                         f"{dtype} tensor of shape {list(out.shape)}")
    mask = buf[HEADER_BYTES:HEADER_BYTES + _mask_bytes(numel)]
    weights = _BIT_WEIGHTS.to(buf.device).to(torch.uint8)
    nonzero = ((mask.view(-1, 1) & weights) != 0).reshape(-1)[:numel]
    start = _values_offset(numel)
    values = buf[start:start + nnz * elem_size].view(-1, elem_size)
    dense = torch.zeros(numel, elem_size, dtype=torch.uint8, device=buf.device)
    dense[nonzero] = values
    out.view(-1).view(torch.uint8).copy_(dense.reshape(-1))
    return out
