"""Transfer backends against raw pinned cudaMemcpyAsync, and zero-value compression on
ResNet-50's ReLU outputs.

    python bench/transfer.py [--out bench/results/<device>/transfer.txt] [--batch 32]

On a GPU: for sizes 64 KiB to 1 GiB, the bandwidth (GB/s, median over repeats timed with
CUDA events) of one D2H copy, one H2D copy and both at once (the two summed), first raw --
the native library's cudaMemcpyAsync between cudaHostAlloc memory and the device -- then
through each backend's ``offload`` / ``prefetch`` with its own host buffers. Then
ResNet-50's ReLU outputs (one forward at --batch, 224x224, random weights and inputs: the
density of a trained network's activations differs): each output's density, the bytes
compression leaves, and the time of a compressed round trip (``offload_compressed`` +
``prefetch_compressed``) against a raw one (``offload`` + ``prefetch``), each checked
bit-identical.

Without a GPU only the compression ratio is measured, with the CPU reference.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from pathlib import Path

import torch

from vmem import models
from vmem.transfer import backends, compression, make_backend, native

SIZES = [64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20, 1 << 30]


def _repeats(nbytes: int) -> int:
    return max(5, min(50, (256 << 20) // nbytes))


def _median_ms(run, repeats: int) -> float:
    """Median milliseconds of ``run(stream_pair)``, timed with events on the current stream
    after ``run`` has made it wait for its work."""
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def _bandwidths(d2h, h2d, nbytes: int) -> tuple[float, float, float]:
    """GB/s of ``d2h()``, of ``h2d()``, and of both issued together (bytes summed)."""
    repeats = _repeats(nbytes)

    def both():
        d2h()
        h2d()

    return (_gbps(nbytes, _median_ms(d2h, repeats)), _gbps(nbytes, _median_ms(h2d, repeats)),
            _gbps(2 * nbytes, _median_ms(both, repeats)))


def _raw_copy(library, stream, dst: torch.Tensor, src: torch.Tensor) -> None:
    stream.wait_stream(torch.cuda.current_stream())
    library.copy(dst.data_ptr(), src.data_ptr(), src.numel(), stream.cuda_stream)
    torch.cuda.current_stream().wait_stream(stream)  # the timing events cover the copy


def _raw_rows(library: native.NativeLibrary, sizes: list[int]) -> dict[int, tuple]:
    arena = native.Arena(library, block_bytes=max(sizes))
    d2h_stream, h2d_stream = torch.cuda.Stream(), torch.cuda.Stream()
    rows = {}
    for nbytes in sizes:
        host_out, host_in = arena.tensor(nbytes), arena.tensor(nbytes)
        host_in.random_(0, 256)
        device_src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
        device_dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        rows[nbytes] = _bandwidths(
            functools.partial(_raw_copy, library, d2h_stream, host_out, device_src),
            functools.partial(_raw_copy, library, h2d_stream, device_dst, host_in), nbytes)
        assert torch.equal(host_out, device_src.cpu()) and torch.equal(device_dst.cpu(), host_in)
    return rows


def _offload(backend, src: torch.Tensor, host: torch.Tensor) -> None:
    backend.consume(src, backend.offload(src, host))  # the compute stream waits for it


def _prefetch(backend, host: torch.Tensor, held: list) -> None:
    dst, event = backend.prefetch(host, None)
    backend.consume(dst, event)
    held[:] = [dst]


def _backend_rows(name: str, sizes: list[int]) -> dict[int, tuple]:
    backend = make_backend(name, torch.device("cuda"))
    rows = {}
    for nbytes in sizes:
        src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
        host_out, host_in = backend.host_buffer(nbytes), backend.host_buffer(nbytes)
        host_in.random_(0, 256)
        held: list[torch.Tensor] = []
        rows[nbytes] = _bandwidths(functools.partial(_offload, backend, src, host_out),
                                   functools.partial(_prefetch, backend, host_in, held), nbytes)
        backend.synchronize()
        assert torch.equal(host_out, src.cpu()) and torch.equal(held[0].cpu(), host_in)
    return rows


def _relu_outputs(batch: int, device: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = models.resnet50().to(device)
    outputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(o.detach().clone()))
             for m in model.modules() if isinstance(m, torch.nn.ReLU)]
    with torch.no_grad():
        model(torch.randn(batch, 3, 224, 224, device=device))
    for hook in hooks:
        hook.remove()
    return outputs


def _compression_rows(batch: int, device: str) -> list[str]:
    outputs = _relu_outputs(batch, device)
    raw = sum(t.numel() * t.element_size() for t in outputs)
    packed = sum(compression.compressed_nbytes(t.numel(), t.element_size(),
                                               int(torch.count_nonzero(t))) for t in outputs)
    densities = [compression.density(t) for t in outputs]
    lines = [f"ResNet-50 ReLU outputs, batch {batch}, 224x224, fp32, random weights and inputs: "
             f"{len(outputs)} tensors, {raw / 2**30:.2f} GiB",
             f"density min / median / max   {min(densities):.3f} / "
             f"{statistics.median(densities):.3f} / {max(densities):.3f}",
             f"bytes after compression      {packed / 2**30:.2f} GiB: {raw / packed:.2f}x fewer"]
    if device == "cuda":
        lines += _compression_times(outputs)
    return lines


def _compression_times(outputs: list[torch.Tensor]) -> list[str]:
    backend = make_backend("native", torch.device("cuda"))
    sources = [t.reshape(-1).view(torch.uint8) for t in outputs]
    raw_slots = [backend.host_buffer(s.numel()) for s in sources]
    packed_slots = [backend.host_buffer(compression.compressed_nbytes(t.numel(), 4, t.numel()))
                    for t in outputs]
    fetched = []

    def round_trip(compressed: bool):
        fetched.clear()
        for src, raw_slot, packed_slot in zip(sources, raw_slots, packed_slots, strict=True):
            if compressed:
                event = backend.offload_compressed(src, packed_slot, 4)
                dst, done = backend.prefetch_compressed(packed_slot, src.numel(), 4, event)
            else:
                dst, done = backend.prefetch(raw_slot, backend.offload(src, raw_slot))
            backend.consume(dst, done)
            fetched.append(dst)

    times = {}
    for compressed in (False, True):
        times[compressed] = _median_ms(lambda c=compressed: round_trip(c), 5)
        for src, dst in zip(sources, fetched, strict=True):
            assert torch.equal(src, dst), "round trip not bit-identical"
    return [f"round trip of all of them    raw {times[False]:.1f} ms, compressed "
            f"{times[True]:.1f} ms ({times[False] / times[True]:.2f}x), both bit-identical"]


def _table(title: str, rows: dict[int, tuple], raw: dict[int, tuple] | None) -> list[str]:
    lines = [title, f"{'size':>9} {'D2H GB/s':>9} {'H2D GB/s':>9} {'both GB/s':>10}"
             + ("  % of raw (D2H/H2D/both)" if raw else "")]
    for nbytes, values in rows.items():
        size = f"{nbytes >> 20} MiB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KiB"
        line = f"{size:>9} " + " ".join(f"{v:>9.2f}" for v in values)
        if raw:
            line += "  " + " / ".join(f"{100 * v / r:.0f}%" for v, r in
                                      zip(values, raw[nbytes], strict=True))
        lines.append(line)
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the report here")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-size", type=int, default=SIZES[-1], help="largest copy, bytes")
    args = parser.parse_args(argv)
    lines = [f"torch {torch.__version__}; native library: {native.status()}",
             f"backends here: {', '.join(backends())}", ""]
    if torch.cuda.is_available():
        sizes = [s for s in SIZES if s <= args.max_size]
        lines[0] += f"; {torch.cuda.get_device_name()}"
        raw = _raw_rows(native.load(), sizes)
        lines += _table("raw cudaMemcpyAsync, cudaHostAlloc memory", raw, None)
        for name in backends():
            lines += _table(f"backend {name}", _backend_rows(name, sizes), raw)
        lines += _compression_rows(args.batch, "cuda")
    else:
        lines += ["no CUDA device: bandwidths not measured; compression ratio from the CPU "
                  "reference", ""]
        lines += _compression_rows(args.batch, "cpu")
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
