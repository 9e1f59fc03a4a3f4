"""How long shape-only profiling takes (the foundation's "vgg16 batch 256 in < 10 s" goal).

    python bench/profile_time.py

Builds each model on the meta device, profiles one training step, and prints a table:
seconds for the profile alone and for the whole `python -m vmem profile` command.
"""

from __future__ import annotations

import subprocess
import sys
import time

import torch

from vmem import models
from vmem.errors import format_bytes
from vmem.preprocessing import profile_network

CASES = [("vgg16", 256, 224), ("resnet50", 256, 224), ("resnet152", 1024, 224)]


def main() -> None:
    print(f"{'model':<10} {'batch':>6} {'layers':>7} {'plain peak':>12} {'profile s':>10} "
          f"{'CLI s':>7}")
    for name, batch, size in CASES:
        with torch.device("meta"):
            model = models.get(name)
        start = time.perf_counter()
        prof = profile_network(model, (batch, 3, size, size), name=name)
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "vmem", "profile", "--model", name, "--batch",
                        str(batch), "--image-size", str(size)], check=True,
                       stdout=subprocess.DEVNULL)
        cli = time.perf_counter() - start
        print(f"{name:<10} {batch:>6} {len(prof.layers):>7} {format_bytes(prof.peak_bytes):>12} "
              f"{seconds:>10.2f} {cli:>7.2f}")


if __name__ == "__main__":
    main()
