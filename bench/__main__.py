"""``python -m bench``: the sweep. Each run is a subprocess (``bench.worker``).

    python -m bench --models resnet50,vgg16 --batch 128 --image-size 224 \\
        --budgets 4GiB,8GiB,16GiB --max-batch --out bench/results
    python -m bench --smoke          # CI: a small sweep on whatever device is here

Without a GPU every run is on the emulated device: speeds are CPU speeds and say so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from vmem.config import parse_size

from .methods import METHODS
from .report import load, write_report

ROOT = Path(__file__).resolve().parent.parent


def _sizes(text: str) -> list[int]:
    sizes = []
    for item in filter(None, text.split(",")):
        size = parse_size(item.strip(), "--budgets")
        if isinstance(size, float):
            raise argparse.ArgumentTypeError(f"{item!r}: give budgets in bytes or units")
        sizes.append(size)
    return sizes


def _names(choices: list[str] | None):
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in names if choices and n not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)}")
        return names
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=_names(None),
                   default=["resnet50", "vgg16"] if cuda else ["resnet20"])
    p.add_argument("--batch", type=int, default=128 if cuda else 32)
    p.add_argument("--image-size", type=int, default=224 if cuda else 32)
    p.add_argument("--classes", type=int, default=1000 if cuda else 10)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--budgets", type=_sizes,
                   default=_sizes("4GiB,8GiB,16GiB" if cuda else "24MiB,32MiB,48MiB"))
    p.add_argument("--methods", type=_names(METHODS), default=METHODS)
    p.add_argument("--iterations", type=int, default=20 if cuda else 5)
    p.add_argument("--warmup", type=int, default=3 if cuda else 2)
    p.add_argument("--max-batch", action="store_true", help="also search each method's "
                   "largest batch per budget (doubling, then bisection)")
    p.add_argument("--max-batch-limit", type=int, default=4096 if cuda else 512)
    p.add_argument("--timeout", type=int, default=900, help="seconds per run")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--traces", action="store_true", help="write each vmem run's simulated "
                   "step (the plan in force) as a Chrome/Perfetto trace under OUT/traces")
    p.add_argument("--report", type=Path, metavar="RESULTS_JSONL",
                   help="only rewrite the table and plots from an earlier sweep's records")
    p.add_argument("--smoke", action="store_true",
                   help="a sweep of under two minutes: resnet20, 32x32, two budgets, four "
                        "methods, three timed iterations, traces, no plots")
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.batch, args.image_size, args.classes = ["resnet20"], 16, 32, 10
        args.budgets = _sizes("16MiB,24MiB")
        args.methods = ["plain", "checkpoint", "vmem-vdnn_all", "vmem-auto"]
        args.iterations, args.warmup, args.max_batch, args.traces = 3, 1, False, True
    for name in ("batch", "image_size", "iterations", "max_batch_limit"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer")
    return args


class Progress:
    """A progress bar line per finished run: how far the sweep is, how long it has taken."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.time()

    def update(self, label: str, record: dict) -> None:
        self.done += 1
        speed = record.get("images_per_s")
        result = record["status"] if speed is None else f"{speed:.1f} img/s"
        filled = round(20 * self.done / self.total)
        bar = "#" * filled + "." * (20 - filled)
        elapsed = time.time() - self.start
        print(f"[{bar}] {self.done}/{self.total} {elapsed:.0f} s  {label}: {result}",
              flush=True)


def run_one(spec: dict, timeout: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    try:
        done = subprocess.run([sys.executable, "-m", "bench.worker", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=ROOT)
    except subprocess.TimeoutExpired:
        return dict(spec, status="timeout", message=f"over {timeout} s")
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        status = "oom" if "out of memory" in done.stderr.lower() else "error"
        return dict(spec, status=status, message=last[:300])
    return json.loads(lines[-1])


def max_batch(base: dict, limit: int, timeout: int) -> tuple[int, int, str]:
    """Largest batch that trains 3 steps under the budget: doubling, then bisection.

    Returns (largest batch that fits or 0, number of runs, status of the first run)."""
    statuses = []

    def fits(batch: int) -> bool:
        statuses.append(run_one(dict(base, batch=batch, warmup=3, iterations=0),
                                timeout)["status"])
        return statuses[-1] == "ok"

    if not fits(1):
        return 0, 1, statuses[0]
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    if high <= limit:  # bisect between the last batch that fitted and the first that did not
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle) else (low, middle)
    return low, len(statuses), statuses[0]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        print(write_report(load(args.report), args.report.parent))
        return 0
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu-emulated"
    slug = device.lower().replace(" ", "-").replace("/", "-")
    out = args.out / slug
    out.mkdir(parents=True, exist_ok=True)
    records = []
    plan = [(m, b, meth) for m in args.models for b in args.budgets for meth in args.methods]
    progress = Progress(len(plan) + len(args.models) * 2)
    base = dict(batch=args.batch, image_size=args.image_size, classes=args.classes,
                precision=args.precision, warmup=args.warmup, iterations=args.iterations,
                argv=sys.argv[1:] if argv is None else list(argv))
    for model in args.models:
        # Unbudgeted plain and, at half its peak, vmem-auto: the headline comparison.
        plain = run_one(dict(base, model=model, method="plain", budget=None, trace=True,
                             kind="reference"), args.timeout)
        records.append(plain)
        progress.update(f"{model} plain, no budget", plain)
        half = (plain.get("peak_allocated") or 0) // 2 or None
        record = run_one(dict(base, model=model, method="vmem-auto", budget=half, trace=True,
                              kind="half_plain_peak"), args.timeout)
        records.append(record)
        progress.update(f"{model} vmem-auto at half the plain peak", record)
    traces = str(out / "traces") if args.traces else None
    for model, budget, method in plan:
        record = run_one(dict(base, model=model, method=method, budget=budget,
                              kind="throughput", trace_dir=traces), args.timeout)
        records.append(record)
        progress.update(f"{model} {method} at {budget / 2**20:.0f} MiB", record)
    if args.max_batch:
        searches = [(m, b, meth) for m, b, meth in plan]
        search_progress = Progress(len(searches))
        for model, budget, method in searches:
            spec = dict(base, model=model, method=method, budget=budget)
            largest, runs, status = max_batch(spec, args.max_batch_limit, args.timeout)
            status = "unavailable" if status == "unavailable" else "ok"
            record = dict(spec, kind="max_batch", status=status, max_batch=largest, runs=runs)
            records.append(record)
            search_progress.update(f"max batch {model} {method} at {budget / 2**20:.0f} MiB",
                                   dict(status=f"batch {largest}"))
    with open(out / "results.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    table = write_report(records, out, plots=not args.smoke)
    print("\n" + table)
    print(f"\nwritten to {out}")
    return 0 if any(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
