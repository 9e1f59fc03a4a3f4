"""The demo (the README's main job): train under half the plain peak, against plain PyTorch.

On a GPU it trains ResNet-50 at batch 128, 224x224; without one, He et al.'s CIFAR
ResNet-20 at batch 128, 32x32, on the emulated device. Both runs use the same seeds and
synthetic data: plain PyTorch first (its measured peak sets the budget: half of it), then
``vmem.session`` with the ``auto`` policy. It prints the plan, the predicted and measured
peaks, the speed of both, and whether the final weights are bit-identical.
"""

from __future__ import annotations

import contextlib
import copy
import time

import torch
from torch import nn

from . import models
from .errors import format_bytes
from .meter import DeviceMeter, EmulatedMeter
from .preprocessing.hardware import detect_hardware
from .session import session


def run_demo(steps: int = 4) -> int:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    name, shape, classes = ("resnet50", (128, 3, 224, 224), 1000) if cuda else \
        ("resnet20", (128, 3, 32, 32), 10)
    print(f"device: {detect_hardware(device).summary()}" +
          ("" if cuda else " [emulated: no CUDA device here]"))
    torch.manual_seed(0)
    model = models.get(name, num_classes=classes).to(device)
    print(f"model: {name}, batch {shape[0]}, {shape[2]}x{shape[3]}, SGD with momentum, "
          f"{steps} steps\n")

    plain_model = copy.deepcopy(model)
    with DeviceMeter.for_device(device) as meter:
        if isinstance(meter, EmulatedMeter):
            meter.track([*plain_model.parameters(), *plain_model.buffers()])
        plain_seconds = _train(plain_model, shape, classes, device, steps,
                               contextlib.nullcontext())
    plain_peak = meter.peak
    budget = plain_peak // 2
    print(f"plain PyTorch: peak {format_bytes(plain_peak)}, {plain_seconds * 1e3:.0f} ms/step")
    print(f"budget: half of that, {format_bytes(budget)}\n")

    vmem_model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(vmem_model.parameters(), lr=0.01, momentum=0.9)
    budgeted = session(vmem_model, optimizer=optimizer, budget=budget)
    seconds = _train(vmem_model, shape, classes, device, steps, budgeted, optimizer)
    print(budgeted.report())
    same = all(torch.equal(a, b) for a, b in zip(plain_model.state_dict().values(),
                                                  vmem_model.state_dict().values(),
                                                  strict=True))
    print(f"\nvmem: peak {format_bytes(budgeted.peak)} within the budget "
          f"{format_bytes(budget)}: {budgeted.peak <= budget}; {seconds * 1e3:.0f} ms/step, "
          f"{plain_seconds / seconds:.2f}x plain's speed; weights bit-identical to plain: "
          f"{same}")
    return 0


def _train(model: nn.Module, shape: tuple[int, ...], classes: int, device: torch.device,
           steps: int, context, optimizer: torch.optim.Optimizer | None = None) -> float:
    """SGD-with-momentum steps on seeded synthetic data; seconds per step after the first."""
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    data = torch.Generator(device=device).manual_seed(1)
    loss_fn = nn.CrossEntropyLoss()
    with context:
        for step in range(steps):
            if step == min(1, steps - 1):  # time all but the first step (all, if only one)
                _synchronize(device)
                start = time.perf_counter()
            x = torch.randn(shape, device=device, generator=data)
            y = torch.randint(0, classes, (shape[0],), device=device, generator=data)
            loss_fn(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        _synchronize(device)
    return (time.perf_counter() - start) / max(steps - 1, 1)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
