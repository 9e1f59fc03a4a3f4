"""The demo (the README's main job): what vmem sees of this machine and of a network.

On a GPU it profiles ResNet-50 at batch 64, 224x224, trains it for a few steps on synthetic
data and compares the profile's predicted peak with the measured one; without a GPU it does the
same on the emulated device with a ResNet-18 at batch 8, 64x64.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from . import models
from .errors import format_bytes
from .meter import DeviceMeter
from .preprocessing import profile_network
from .preprocessing.hardware import detect_hardware


def run_demo(steps: int = 3) -> int:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    name, batch, size, classes = ("resnet50", 64, 224, 1000) if cuda else ("resnet18", 8, 64, 10)
    spec = detect_hardware(device)
    print(f"device: {spec.summary()}" + ("" if cuda else " [emulated: no CUDA device here]"))

    model = models.get(name, num_classes=classes).to(device)
    shape = (batch, 3, size, size)
    prof = profile_network(model, shape, name=name)  # shape-only, on meta
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    state_bytes = prof.param_bytes  # SGD momentum: one buffer per parameter
    predicted = prof.peak_bytes + state_bytes
    print(f"\n{name}, input {'x'.join(map(str, shape))}: {len(prof.layers)} layers, "
          f"parameters {format_bytes(prof.param_bytes)}, saved activations "
          f"{format_bytes(prof.saved_bytes)}, forward {prof.forward_flops / 1e9:.1f} GFLOP")
    print(f"predicted plain peak: {format_bytes(predicted)} (profile "
          f"{format_bytes(prof.peak_bytes)} + SGD momentum {format_bytes(state_bytes)})")

    measured, seconds = _train(model, optimizer, shape, classes, device, steps)
    error = (measured - predicted) / predicted * 100
    print(f"measured plain peak:  {format_bytes(measured)} over steps 2-{max(steps, 2)} "
          f"({error:+.1f}% against predicted), {seconds * 1e3:.0f} ms/step, "
          f"{batch / seconds:.1f} images/s")
    print("\nA budgeted run (vmem.session offloading to host memory) plans from this profile.")
    return 0


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, shape: tuple[int, ...],
           classes: int, device: torch.device, steps: int) -> tuple[int, float]:
    """Plain training on synthetic data; the peak and time of the steps after the first."""
    x = torch.randn(shape, device=device)
    y = torch.randint(0, classes, (shape[0],), device=device)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        loss_fn(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with DeviceMeter.for_device(device) as meter:
        if hasattr(meter, "track"):
            meter.track([*model.parameters(), *model.buffers(), x, y])
        step()  # the first step allocates the optimizer state
        if device.type == "cuda":
            torch.cuda.synchronize()
        meter.reset_peak()
        start = time.perf_counter()
        for _ in range(max(steps - 1, 1)):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / max(steps - 1, 1)
    return meter.peak, seconds
