"""The hardware spec: what the device and its host link offer.

On a CUDA device, NVML (the ``nvidia-ml-py`` package, imported as ``pynvml``) gives the name,
memory and PCIe link; small micro-benchmarks measure pinned host-to-device and
device-to-host bandwidth and the achieved fp32 matrix-product rate. Results are cached per
device, in the process and in ``$XDG_CACHE_HOME/vmem`` (``~/.cache/vmem``).

Where there is no GPU (or NVML cannot be read) vmem describes the *emulated device*: a spec
with the defaults below, overridable with ``VMEM_EMULATED_DEVICE``, a comma-separated list of
``key=value`` pairs with keys ``memory`` (a size), ``link``, ``h2d``, ``d2h`` (bytes/s) and
``flops`` (FLOP/s), e.g. ``VMEM_EMULATED_DEVICE="memory=12GiB,h2d=6e9,d2h=6e9"``.

Example::

    >>> from vmem.preprocessing.hardware import detect_hardware
    >>> spec = detect_hardware("cpu")
    >>> spec.emulated, spec.total_memory
    (True, 17179869184)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from pathlib import Path

import torch

from ..config import parse_size

__all__ = ["HardwareSpec", "detect_hardware", "emulated_spec", "EMULATED_DEFAULTS",
           "pcie_bandwidth"]

log = logging.getLogger("vmem")

# The emulated device: a 16 GiB card on PCIe 3.0 x16 (about 15.8 GB/s each way in theory,
# 12 GB/s achieved with pinned memory) computing 10 TFLOP/s.
# Theoretical bytes/s per lane and direction of each PCIe generation (after line encoding).
_PCIE_LANE = {1: 250e6, 2: 500e6, 3: 984.6e6, 4: 1969e6, 5: 3938e6, 6: 7877e6}

EMULATED_DEFAULTS = {"memory": 16 * 2**30, "link": _PCIE_LANE[3] * 16, "h2d": 12e9,
                     "d2h": 12e9, "flops": 10e12}


def pcie_bandwidth(generation: int | None, width: int | None) -> float | None:
    """Theoretical one-direction bandwidth of a PCIe link in bytes/s (None if unknown)."""
    if generation not in _PCIE_LANE or not width:
        return None
    return _PCIE_LANE[generation] * width


@dataclasses.dataclass(frozen=True)
class HardwareSpec:
    """What vmem plans against. Bandwidths in bytes/s, compute in FLOP/s, memory in bytes."""

    name: str  # device name, e.g. "NVIDIA H100 80GB HBM3", or "emulated (cpu)"
    emulated: bool  # True: the CPU stands in for a GPU (numbers from EMULATED_DEFAULTS)
    total_memory: int
    free_memory: int
    pcie_generation: int | None  # the link's maximum generation, as NVML reports it
    pcie_width: int | None  # lanes
    link_bandwidth: float | None  # theoretical, one direction
    h2d_bandwidth: float  # measured, pinned host to device
    d2h_bandwidth: float  # measured, device to pinned host
    compute_rate: float  # achieved fp32 matrix-product FLOP/s
    # The roofline (:mod:`vmem.control.simulator`); None: not known, the term is left out.
    memory_bandwidth: float | None = None  # achieved device-memory bytes/s (read + write)
    tf32_rate: float | None = None  # achieved FLOP/s of fp32 convolutions run as TF32
    half_rate: float | None = None  # achieved bf16/fp16 matrix FLOP/s

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    def summary(self) -> str:
        link = "unknown link" if self.pcie_generation is None else \
            f"PCIe {self.pcie_generation}.0 x{self.pcie_width}"
        rates = f"{self.compute_rate / 1e12:.1f} TFLOP/s"
        if self.tf32_rate or self.half_rate:
            rates = f"fp32 / tf32 / half {self.compute_rate / 1e12:.1f} / " \
                f"{(self.tf32_rate or self.compute_rate) / 1e12:.0f} / " \
                f"{(self.half_rate or self.compute_rate) / 1e12:.0f} TFLOP/s"
        if self.memory_bandwidth:
            rates += f", device memory {self.memory_bandwidth / 1e12:.2f} TB/s"
        return (f"{self.name}: {self.total_memory / 2**30:.1f} GiB ({self.free_memory / 2**30:.1f}"
                f" free), {link}, H2D {self.h2d_bandwidth / 1e9:.1f} GB/s, D2H "
                f"{self.d2h_bandwidth / 1e9:.1f} GB/s, {rates}")


def detect_hardware(device: torch.device | str | None = None) -> HardwareSpec:
    """The spec of ``device`` (the current CUDA device, or the emulated one without CUDA)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda":
        return emulated_spec(os.environ.get("VMEM_EMULATED_DEVICE", ""))
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_spec(index)


@functools.cache
def emulated_spec(overrides: str = "") -> HardwareSpec:
    """The emulated device's spec, with ``key=value`` overrides (see the module docstring)."""
    values = dict(EMULATED_DEFAULTS)
    for item in filter(None, (part.strip() for part in overrides.split(","))):
        key, _, text = item.partition("=")
        key = key.strip()
        if key not in values or not text:
            raise ValueError(f"VMEM_EMULATED_DEVICE: {item!r} is not key=value with a key of "
                             f"{', '.join(values)}; e.g. 'memory=12GiB,h2d=6e9'")
        try:
            values[key] = parse_size(text.strip(), "memory") if key == "memory" else float(text)
        except ValueError as err:
            raise ValueError(f"VMEM_EMULATED_DEVICE: {item!r}: {err}") from None
        if values[key] <= 0 or (key == "memory" and isinstance(values[key], float)):
            raise ValueError(f"VMEM_EMULATED_DEVICE: {item!r} must be a positive number "
                             "(memory a size such as 12GiB)")
    memory = int(values["memory"])
    log.info("vmem: no CUDA device; planning for the emulated device (%s)", overrides or
             "defaults; set VMEM_EMULATED_DEVICE to change them")
    return HardwareSpec(name="emulated (cpu)", emulated=True, total_memory=memory,
                        free_memory=memory, pcie_generation=3, pcie_width=16,
                        link_bandwidth=values["link"], h2d_bandwidth=values["h2d"],
                        d2h_bandwidth=values["d2h"], compute_rate=values["flops"])


@functools.cache
def _cuda_spec(index: int) -> HardwareSpec:
    props = torch.cuda.get_device_properties(index)
    free, total = torch.cuda.mem_get_info(index)
    nvml = _read_nvml(str(getattr(props, "uuid", "")), index)
    if nvml is None:
        log.info("vmem: NVML unavailable; PCIe link of %s unknown, bandwidth measured only",
                 props.name)
        nvml = {"pcie_generation": None, "pcie_width": None}
    cache = _cache_path(str(getattr(props, "uuid", index)))
    measured = _load_cached(cache)
    if measured is None or set(measured) != set(_MEASURED):
        measured = _measure(index, cache)
        torch.cuda.empty_cache()  # leave no cached blocks behind to count against a budget
    return HardwareSpec(name=props.name, emulated=False, total_memory=total, free_memory=free,
                        link_bandwidth=pcie_bandwidth(nvml["pcie_generation"], nvml["pcie_width"]),
                        **nvml, **measured)


def _read_nvml(uuid: str, index: int) -> dict | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = _nvml_handle(pynvml, uuid, index)
            return {"pcie_generation": pynvml.nvmlDeviceGetMaxPcieLinkGeneration(handle),
                    "pcie_width": pynvml.nvmlDeviceGetMaxPcieLinkWidth(handle)}
        finally:
            pynvml.nvmlShutdown()
    except Exception as err:  # no library, no driver, or no such device: say so, go on
        log.info("vmem: NVML read failed (%s)", err)
        return None


def _nvml_handle(pynvml, uuid: str, index: int):
    """The device by UUID (CUDA and NVML may number devices differently), else by index."""
    for name in (f"GPU-{uuid}", uuid) if uuid else ():
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(name)
        except Exception:
            continue
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def _cache_path(key: str) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vmem"
    return root / f"hardware-{key}-torch{torch.__version__}.json"


def _load_cached(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


_MEASURED = ("h2d_bandwidth", "d2h_bandwidth", "compute_rate", "memory_bandwidth",
             "tf32_rate", "half_rate")


def _measure(index: int, cache: Path) -> dict:
    """Pinned H2D and D2H bandwidth (256 MiB copies), device-memory bandwidth (a 256 MiB
    device copy, bytes read and written), and the fp32, TF32 and bf16 matrix-product
    rates (4096³), each the median of 5."""
    device = torch.device("cuda", index)
    nbytes = 256 * 2**20
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    other = torch.empty_like(dev)
    h2d = nbytes / _median_seconds(lambda: dev.copy_(host, non_blocking=True), device)
    d2h = nbytes / _median_seconds(lambda: host.copy_(dev, non_blocking=True), device)
    memory = 2 * nbytes / _median_seconds(lambda: other.copy_(dev), device)
    n = 4096
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    flops = 2 * n**3 / _median_seconds(lambda: torch.mm(a, b), device)
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        tf32 = 2 * n**3 / _median_seconds(lambda: torch.mm(a, b), device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed
    a, b = a.bfloat16(), b.bfloat16()
    half = 2 * n**3 / _median_seconds(lambda: torch.mm(a, b), device)
    measured = {"h2d_bandwidth": h2d, "d2h_bandwidth": d2h, "compute_rate": flops,
                "memory_bandwidth": memory, "tf32_rate": tf32, "half_rate": half}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(measured))
    except OSError as err:
        log.info("vmem: could not cache the hardware spec at %s (%s)", cache, err)
    return measured


def _median_seconds(work, device: torch.device, repeats: int = 5) -> float:
    with torch.cuda.device(device):
        work()  # warm-up
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            work()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]
