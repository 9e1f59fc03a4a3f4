"""One benchmark run, in its own process so one out-of-memory cannot poison the next.

    python -m bench.worker '{"model": "resnet20", "batch": 32, "image_size": 32, ...}'

prints one JSON line: the spec, what happened (``status``), and the measurements.
"""

from __future__ import annotations

import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import vmem
from vmem.errors import BudgetTooSmall, OutOfBudget
from vmem.meter import DeviceMeter, EmulatedMeter

from .methods import Method, Unavailable


def build_model(name: str, classes: int) -> tuple[nn.Module, str]:
    """torchvision's model when torchvision imports, vmem's drop-in otherwise."""
    try:
        import torchvision

        return getattr(torchvision.models, name)(num_classes=classes), "torchvision"
    except Exception:  # not installed, no such model (resnet20), or no load on this torch
        return vmem.models.get(name, num_classes=classes), "vmem.models"


class _Trace(TorchDispatchMode):
    """Device bytes in use after every operator of one step (the memory-over-time curve)."""

    def __init__(self, meter: DeviceMeter) -> None:
        super().__init__()
        self.meter, self.curve = meter, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.curve.append(self.meter.current)
        return out


def run(spec: dict) -> dict:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    record = dict(spec, device=torch.cuda.get_device_name() if cuda else "cpu (emulated)",
                  emulated=not cuda, torch=torch.__version__, vmem=vmem.__version__,
                  python=platform.python_version(), status="ok", message="")
    torch.manual_seed(0)
    model, record["models_from"] = build_model(spec["model"], spec.get("classes", 1000))
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    budget = spec.get("budget")
    try:
        method = Method(spec["method"], model, optimizer, budget, device)
    except Unavailable as err:
        return dict(record, status="unavailable", message=str(err))
    meter = _cap(device, budget, model, method)
    try:
        cap = meter if isinstance(meter, EmulatedMeter) else contextlib.nullcontext()
        with cap, method.context:
            times, curve = _loop(spec, model, optimizer, method, device, meter)
    except (torch.OutOfMemoryError, OutOfBudget) as err:
        return dict(record, status="oom", message=str(err).splitlines()[0][:300])
    except BudgetTooSmall as err:
        return dict(record, status="too_small", message=str(err), minimum=err.minimum)
    finally:
        if cuda and budget is not None and method.session is None:
            torch.cuda.set_per_process_memory_fraction(1.0)
    if method.session is not None and not cuda:
        peak = method.session.peak
    else:
        peak = meter.peak
    reserved = meter.reserved_peak if cuda else peak  # the session's traced steps reset
    # torch's peak statistics; the meter keeps the maxima from before
    median = statistics.median(times) if times else None
    record.update(peak_allocated=peak, peak_reserved=reserved,
                  iter_ms=None if median is None else median * 1e3,
                  images_per_s=None if not median else spec["batch"] / median,
                  timed_iterations=len(times), **method.transfer_stats())
    if curve is not None:
        record["memory_curve"] = curve
    if spec.get("trace_dir") and method.session is not None:
        path = Path(spec["trace_dir"]) / (f"{spec['model']}-{spec['method']}-"
                                          f"{spec.get('budget') or 'none'}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        method.session.simulation().write_trace(str(path))
        record["trace"] = str(path)
    return record


def _cap(device: torch.device, budget: int | None, model: nn.Module, method: Method):
    """The same cap for every method: the memory fraction on CUDA, the meter elsewhere."""
    if device.type == "cuda":
        meter = DeviceMeter.for_device(device)
        meter.reset_peak()
        if budget is not None and method.session is None:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(budget / total)
        return meter
    if method.session is not None:  # the session meters (and caps) the emulated device
        return None
    meter = EmulatedMeter(device, limit=budget)
    meter.track([*model.parameters(), *model.buffers()])
    return meter


def _loop(spec, model, optimizer, method, device, meter):
    """Warm-up steps, then timed steps; the memory curve of the last warm-up step if asked."""
    x = torch.randn(spec["batch"], 3, spec["image_size"], spec["image_size"], device=device)
    y = torch.randint(0, spec.get("classes", 1000), (spec["batch"],), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=spec.get("precision") == "bf16")
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        with autocast:
            loss = loss_fn(method.forward(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    curve = None
    for i in range(spec.get("warmup", 2)):
        if spec.get("trace") and i == spec.get("warmup", 2) - 1:
            trace = _Trace(method.session.meter if method.session else meter)
            with trace:
                step()
            curve = trace.curve
        else:
            step()
    times = []
    for _ in range(spec.get("iterations", 20)):
        times.append(_timed(step, device))
    return times, curve


def _timed(step, device: torch.device) -> float:
    if device.type != "cuda":
        start = time.perf_counter()
        step()
        return time.perf_counter() - start
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3



if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
