"""How long planning takes (issue: "planning ResNet-152 batch 256 takes < 1 s on CPU").

    python bench/plan_time.py

For each model at batch 256, 224x224, fp32, SGD with momentum, a budget of 40% of its
plain peak (VGG-16: 85%, above what offloading alone needs) and the emulated device's spec:
the shape-only profile (done once per input shape), then the planning proper (make_plan
with the timeline simulator, which tries every prefetch distance), then ``plan_model``'s
whole ``auto`` (which also profiles the model with its runs recomputed and plans and
simulates the fixed policies), each the median of 3.
"""

from __future__ import annotations

import statistics
import time

import torch

from vmem import models
from vmem.control import make_plan
from vmem.control.planner import headroom_for
from vmem.errors import format_bytes
from vmem.planning import plan_model
from vmem.preprocessing import profile_network
from vmem.preprocessing.hardware import emulated_spec
from vmem.preprocessing.optimizer import profile_optimizer

CASES = [("resnet152", 256, 0.4), ("resnet50", 256, 0.4), ("vgg16", 256, 0.85)]


def _median_seconds(run, *args, repeats: int = 3, **kwargs):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _case(name: str, batch: int, fraction: float, spec) -> str:
    with torch.device("meta"):
        model = models.get(name)
    optimizer = profile_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    x = torch.empty(batch, 3, 224, 224, device="meta")
    profile_s, prof = _median_seconds(profile_network, model, tuple(x.shape))
    budget, headroom = int(prof.peak_bytes * fraction), headroom_for("cuda")
    plan_s, plan = _median_seconds(make_plan, prof, budget=budget, policy="auto",
                                   optimizer=optimizer, headroom=headroom, spec=spec)
    whole_s, planned = _median_seconds(plan_model, model, (x,), budget=budget, policy="auto",
                                       headroom=headroom, optimizer=optimizer, spec=spec)
    chosen = "recompute" if planned.plan.splits else "offload"
    return (f"{name:<10} {batch:>6} {format_bytes(budget):>11} {profile_s:>10.2f} "
            f"{plan_s:>12.3f} {whole_s:>13.2f} {planned.plan.predicted_seconds:>9.3f}s "
            f"{chosen:>10}")


def main() -> None:
    spec = emulated_spec()
    print(f"{'model':<10} {'batch':>6} {'budget':>11} {'profile s':>10} {'make_plan s':>12} "
          f"{'plan_model s':>13} {'predicted':>10} {'chosen':>10}")
    for case in CASES:
        print(_case(*case, spec), flush=True)


if __name__ == "__main__":
    main()
