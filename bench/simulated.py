"""Simulated step times of ``auto`` on a hardware preset, against the simulated plain step,
and the plain step against published single-GPU training throughput.

    python -m bench.simulated [--hardware h100-pcie] [--out bench/results/simulated.txt]

Shape-only (allocates nothing, needs no GPU): each row is ``python -m vmem plan`` for that
model, batch, precision and budget, the budget a fraction of plain's predicted peak.
"""

from __future__ import annotations

import argparse
import time

import torch

from vmem import BudgetTooSmall, models
from vmem.control.planner import headroom_for
from vmem.planning import plan_model
from vmem.preprocessing.optimizer import profile_optimizer
from vmem.preprocessing.presets import hardware_spec

CASES = [("resnet50", torch.float32, (2, 3, 4)), ("resnet50", torch.bfloat16, (2, 3, 4)),
         ("vgg16", torch.float32, (4,))]
# Published single-GPU training throughput, images/s (see the README for the sources).
PUBLISHED = {"a100": 2470, "h100-sxm": 7040}


def _plan(name, dtype, batch, budget, policy, spec):
    with torch.device("meta"):
        model = models.get(name, num_classes=1000).to(dtype)
    x = torch.empty(batch, 3, 224, 224, device="meta", dtype=dtype)
    optimizer = profile_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    return plan_model(model, (x,), budget=budget, policy=policy, spec=spec,
                      headroom=headroom_for("cuda"), optimizer=optimizer).plan


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hardware", default="h100-pcie")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--out")
    args = parser.parse_args()
    spec = hardware_spec(args.hardware)
    lines = [f"simulated on {spec.summary()}", "",
             f"{'model':<9} {'dtype':<9} {'budget':>9} {'peak GiB':>9} {'step ms':>8} "
             f"{'x plain':>8} {'link GiB':>9} {'blocks':>6} {'plan s':>7}"]
    for name, dtype, fractions in CASES:
        plain = _plan(name, dtype, args.batch, None, "none", spec)
        lines.append(f"{name:<9} {str(dtype)[6:]:<9} {'plain':>9} "
                     f"{plain.predicted_peak / 2**30:>9.2f} "
                     f"{plain.predicted_seconds * 1e3:>8.1f} {1:>8.2f} {0:>9.2f} {0:>6} "
                     f"{'':>7}")
        for fraction in fractions:
            start = time.perf_counter()
            try:
                plan = _plan(name, dtype, args.batch, plain.predicted_peak // fraction,
                             "auto", spec)
            except BudgetTooSmall as error:
                lines.append(f"{name:<9} {str(dtype)[6:]:<9} {'1/' + str(fraction):>9} "
                             f"refused: {error}")
                continue
            seconds = time.perf_counter() - start
            lines.append(
                f"{name:<9} {str(dtype)[6:]:<9} {'1/' + str(fraction):>9} "
                f"{plan.predicted_peak / 2**30:>9.2f} {plan.predicted_seconds * 1e3:>8.1f} "
                f"{plan.predicted_seconds / plain.predicted_seconds:>8.2f} "
                f"{(plan.link_bytes + plan.streamed_bytes) / 2**30:>9.2f} "
                f"{len(plan.recomputed):>6} {seconds:>7.1f}")
        print("\n".join(lines[-len(fractions) - 1:]), flush=True)
    lines += ["", "plain step, bf16, batch 256, against published single-GPU throughput:"]
    for preset, published in PUBLISHED.items():
        plain = _plan("resnet50", torch.bfloat16, 256, None, "none", hardware_spec(preset))
        rate = 256 / plain.predicted_seconds
        lines.append(f"{preset:<9} simulated {plain.predicted_seconds * 1e3:.1f} ms = "
                     f"{rate:.0f} images/s; published {published} images/s: "
                     f"{(rate / published - 1) * 100:+.0f}%")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"python -m bench.simulated --hardware {args.hardware}\n\n{text}\n")


if __name__ == "__main__":
    main()
