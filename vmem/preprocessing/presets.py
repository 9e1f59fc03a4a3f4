"""Hardware presets: GPUs to plan and simulate for without having one (``--hardware h100-pcie``).

Each preset holds the vendor's data-sheet peaks (dense, no sparsity) scaled to what real
kernels achieve, and a pinned host-copy bandwidth measured on such machines:

- tensor-core rates (TF32, bf16) at ``TENSOR_EFFICIENCY`` of peak: cuDNN's convolutions
  in ResNet-50 and VGG run at roughly half to two thirds of the dense tensor peak (their
  maps are small and their channel counts uneven, unlike an 8192³ bf16 matrix product,
  which reaches about 80% on an H200: 770 to 800 of its 989 TFLOP/s);
- fp32 on the CUDA cores (a non-TF32 matrix product) at ``FP32_EFFICIENCY``;
- device memory at ``MEMORY_EFFICIENCY`` of the data-sheet bandwidth: element-wise
  kernels and copies reach about 90% (a device-to-device copy on an H200 moves about 4.3
  of its 4.8 TB/s); BatchNorm's two passes and strided access make 80% a fair average;
- the host link: pinned ``cudaMemcpyAsync`` each way as ``bandwidthTest``/``nvbandwidth``
  report it: about 25 GB/s on PCIe 4.0 x16 (A100), about 55 GB/s on PCIe 5.0 x16 (H100,
  H200), and about 400 GB/s host-to-device over NVLink-C2C (GH200, whose 900 GB/s is
  both directions together).

Data sheets: NVIDIA A100 Tensor Core GPU (SXM4 80GB: fp32 19.5, TF32 156, bf16 312
TFLOP/s, HBM2e 2,039 GB/s); NVIDIA H100 Tensor Core GPU (PCIe 80GB: fp32 51, TF32 378,
bf16 756, HBM2e 2.0 TB/s; SXM5 80GB: fp32 67, TF32 495, bf16 989, HBM3 3.35 TB/s);
NVIDIA H200 (SXM 141GB: the H100 SXM's rates, HBM3e 4.8 TB/s); NVIDIA GH200 Grace Hopper
Superchip (96GB HBM3: the H100 SXM's rates, 4.0 TB/s). The PyTorch CUDA default runs
fp32 convolutions as TF32 (``torch.backends.cudnn.allow_tf32``) and fp32 matrix products
as fp32 (``torch.backends.cuda.matmul.allow_tf32`` off), which is how the simulator prices
them.

Example::

    >>> spec = hardware_spec("h100-pcie")
    >>> round(spec.half_rate / 1e12), round(spec.h2d_bandwidth / 1e9)
    (454, 55)
    >>> hardware_spec("h100-pcie,h2d=30e9").h2d_bandwidth
    30000000000.0
"""

from __future__ import annotations

import dataclasses

from ..config import parse_size
from .hardware import HardwareSpec, emulated_spec, pcie_bandwidth

__all__ = ["PRESETS", "hardware_spec", "TENSOR_EFFICIENCY", "FP32_EFFICIENCY",
           "MEMORY_EFFICIENCY"]

TENSOR_EFFICIENCY = 0.6
FP32_EFFICIENCY = 0.8
MEMORY_EFFICIENCY = 0.8


def _preset(name: str, memory_gib: int, fp32: float, tf32: float, half: float, hbm: float,
            h2d: float, d2h: float, pcie: int | None) -> HardwareSpec:
    total = memory_gib * 2**30
    return HardwareSpec(
        name=f"{name} (preset)", emulated=False, total_memory=total, free_memory=total,
        pcie_generation=pcie, pcie_width=16 if pcie else None,
        link_bandwidth=pcie_bandwidth(pcie, 16) if pcie else None, h2d_bandwidth=h2d,
        d2h_bandwidth=d2h, compute_rate=fp32 * FP32_EFFICIENCY,
        memory_bandwidth=hbm * MEMORY_EFFICIENCY, tf32_rate=tf32 * TENSOR_EFFICIENCY,
        half_rate=half * TENSOR_EFFICIENCY)


PRESETS: dict[str, HardwareSpec] = {
    "a100": _preset("NVIDIA A100-SXM4-80GB", 80, 19.5e12, 156e12, 312e12, 2.039e12,
                    25e9, 25e9, 4),
    "h100-pcie": _preset("NVIDIA H100 PCIe 80GB", 80, 51e12, 378e12, 756e12, 2.0e12,
                         55e9, 55e9, 5),
    "h100-sxm": _preset("NVIDIA H100 SXM5 80GB", 80, 67e12, 495e12, 989e12, 3.35e12,
                        55e9, 55e9, 5),
    "h200": _preset("NVIDIA H200 141GB", 141, 67e12, 495e12, 989e12, 4.8e12, 55e9, 55e9, 5),
    "gh200": _preset("NVIDIA GH200 96GB", 96, 67e12, 495e12, 989e12, 4.0e12, 400e9, 400e9,
                     None),
}

_KEYS = {"memory": "total_memory", "h2d": "h2d_bandwidth", "d2h": "d2h_bandwidth",
         "flops": "compute_rate", "link": "link_bandwidth", "hbm": "memory_bandwidth",
         "tf32": "tf32_rate", "half": "half_rate"}


def hardware_spec(text: str) -> HardwareSpec:
    """The spec ``text`` names: a preset (``h100-pcie``), optionally followed by
    ``key=value`` overrides (``h100-pcie,h2d=30e9``; keys memory, h2d, d2h, flops, link,
    hbm, tf32, half), or overrides of the emulated device alone (``h2d=6e9,flops=2e13``,
    as ``VMEM_EMULATED_DEVICE``; the emulated device with nothing given).

    Raises:
        ValueError: an unknown preset or key, or a value that is not a positive number.
    """
    items = [part.strip() for part in text.split(",") if part.strip()]
    if not items or "=" in items[0]:
        return emulated_spec(",".join(items))
    name, overrides = items[0].lower(), items[1:]
    if name not in PRESETS:
        raise ValueError(f"--hardware {items[0]!r} is not a preset; choose one of "
                         f"{', '.join(PRESETS)}, or give key=value pairs")
    changes = {}
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() not in _KEYS or not value:
            raise ValueError(f"--hardware {item!r} is not key=value with a key of "
                             f"{', '.join(_KEYS)}")
        try:
            number = parse_size(value.strip(), "memory") if key.strip() == "memory" else \
                float(value)
        except ValueError as error:
            raise ValueError(f"--hardware {item!r}: {error}") from None
        if number <= 0:
            raise ValueError(f"--hardware {item!r} must be positive")
        changes[_KEYS[key.strip()]] = int(number) if key.strip() == "memory" else number
    if "total_memory" in changes:
        changes["free_memory"] = changes["total_memory"]
    return dataclasses.replace(PRESETS[name], **changes)
