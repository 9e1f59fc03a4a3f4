"""Feature-map splitting on the emulated device: predicted against measured peak, per parts.

    python bench/split_memory.py [--batch 4] [--image-size 128]

VGG-16-BN's convolutional part (the reference model's ``features``, then global average
pooling and a 10-way linear layer, so that activations, not the 4096-wide classifier's
weights, dominate; fp32) with every block split in 1 (unsplit), 2, 4, 8 and 16 parts along
the height, the blocks' inputs streamed through a host pool: the peak the
shape-only profile predicts, the peak the emulated device's meter measures over one
forward and backward (parameters, buffers and the input included), and the step's seconds.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from vmem import models
from vmem.errors import format_bytes
from vmem.feedforward.pools import HostPool
from vmem.feedforward.split_runs import Splits, find_runs
from vmem.feedforward.stream import HostStash, ShapeStash
from vmem.meter import EmulatedMeter
from vmem.preprocessing import profile_network
from vmem.transfer import make_backend


class _Features(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = models.vgg16_bn().features
        self.head = nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1),
                                       1))


def _measure(model, x: torch.Tensor, choices: dict) -> tuple[int, float]:
    cpu = torch.device("cpu")
    meter = EmulatedMeter(cpu)

    def host_buffer(nbytes: int) -> torch.Tensor:  # host memory is not the device's
        with meter.paused():
            buffer = torch.empty(nbytes, dtype=torch.uint8)
        meter.exclude(buffer)
        return buffer

    stash = HostStash(make_backend("torch", cpu), HostPool(host_buffer), cpu)
    model.zero_grad(set_to_none=True)
    with Splits(model, choices, stash=stash), meter:
        meter.track([*model.parameters(), *model.buffers(), x])
        start = time.perf_counter()
        model(x).sum().backward()
        seconds = time.perf_counter() - start
    return meter.peak, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = _Features()
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)
    runs = find_runs(model)
    print(f"vgg16_bn features, input {list(x.shape)}, fp32, {len(runs)} runs split along the "
          "height")
    print(f"{'parts':>5} {'predicted peak':>15} {'measured peak':>14} {'error':>7} {'step s':>7}")
    for parts in (1, 2, 4, 8, 16):
        choices = {run: (parts, 2) for run in runs} if parts > 1 else {}
        with Splits(model, choices, stash=ShapeStash()):
            predicted = profile_network(model, tuple(x.shape)).peak_bytes
        measured, seconds = _measure(model, x, choices)
        print(f"{parts:>5} {format_bytes(predicted):>15} {format_bytes(measured):>14} "
              f"{(predicted - measured) / measured:>+7.2%} {seconds:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
