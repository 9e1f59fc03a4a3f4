"""Tables and plots from the sweep's JSON records."""

from __future__ import annotations

import json
from pathlib import Path

from vmem.errors import format_bytes
from vmem.preprocessing.hardware import detect_hardware

from .methods import FIXED_POLICIES


def _mib(n) -> str:
    return "-" if n is None else format_bytes(n)


def _speed(record: dict) -> str:
    value = record.get("images_per_s")
    return "-" if value is None else f"{value:.1f}"


def _reference(records: list[dict], model: str) -> dict:
    return next((r for r in records if r.get("kind") == "reference" and r["model"] == model),
                {})


def _link(record: dict) -> str:
    """Bytes over the host link per second of iteration (both directions): a lower bound on
    the link bandwidth the copies achieved, since they overlap compute."""
    moved = (record.get("offloaded_bytes") or 0) + (record.get("prefetched_bytes") or 0)
    if not moved or not record.get("iter_ms"):
        return "-"
    return f"{moved / record['iter_ms'] / 1e6:.2f}"


def _bound(record: dict, reference: dict, spec) -> tuple[str, str]:
    """Iteration-time bound max(compute, D2H/bw, H2D/bw) and the fraction of transfer
    time hidden behind compute; compute time is plain's at the same batch."""
    compute = reference.get("iter_ms")
    off, pre = record.get("offloaded_bytes"), record.get("prefetched_bytes")
    if compute is None or record.get("iter_ms") is None or off is None:
        return "-", "-"
    if record.get("emulated"):  # synchronous copies, emulated bandwidth: nothing to hide
        return "-", "n/a"
    d2h, h2d = off / spec.d2h_bandwidth * 1e3, pre / spec.h2d_bandwidth * 1e3
    bound = max(compute, d2h, h2d)
    transfer = d2h + h2d
    if transfer == 0:
        return f"{bound:.1f}", "-"
    hidden = min(max(1 - (record["iter_ms"] - compute) / transfer, 0.0), 1.0)
    return f"{bound:.1f}", f"{hidden:.0%}"


def _predicted(record: dict) -> str:
    """The timeline simulator's step time for the plan in force, and its error against the
    measured median."""
    predicted, measured = record.get("predicted_ms"), record.get("iter_ms")
    if predicted is None or not measured:
        return "- | -"
    return f"{predicted:.1f} | {(predicted - measured) / measured:+.0%}"


def _auto_against_fixed(records: list[dict]) -> list[str]:
    """Per model and budget: vmem-auto's throughput over the best fixed policy's."""
    rows = []
    for r in records:
        if r.get("kind") != "throughput" or r["method"] != "vmem-auto":
            continue
        fixed = [s for s in records if s.get("kind") == "throughput" and
                 s["method"] in FIXED_POLICIES and s["model"] == r["model"] and
                 s["budget"] == r["budget"] and s.get("images_per_s")]
        if not fixed:
            continue
        best = max(fixed, key=lambda s: s["images_per_s"])
        auto = r.get("images_per_s") or 0.0
        rows.append(f"| {r['model']} | {_mib(r['budget'])} | {auto:.1f} | {best['method']} "
                    f"{best['images_per_s']:.1f} | {auto / best['images_per_s']:.2f} |")
    if not rows:
        return []
    return ["", "## vmem-auto against the best fixed policy", "",
            "| model | budget | auto img/s | best fixed img/s | ratio |", "|---|---|---|---|---|",
            *rows]


def write_report(records: list[dict], out: Path, plots: bool = True) -> str:
    """Write results.md (and PNG plots when matplotlib is there); return the markdown."""
    spec = detect_hardware()
    first = next((r for r in records if "device" in r), {})
    lines = [f"# vmem benchmark: {first.get('device', '?')}", ""]
    if first.get("emulated"):
        lines += ["Emulated device (no GPU): every speed below is a CPU speed, copies are "
                  "synchronous, and bandwidths are the emulated spec's; memory figures are "
                  "exact counts of device-side storage. save_on_cpu's copies are CPU tensors, "
                  "which on the emulated device are device memory, so it cannot save "
                  "anything here: compare it on a GPU.", ""]
    lines += [f"torch {first.get('torch')}, models from {first.get('models_from')}, "
              f"precision {first.get('precision')}, command `python -m bench "
              f"{' '.join(first.get('argv', []))}`", ""]
    lines += ["## Half the plain peak", "",
              "| model | run | budget | peak allocated | img/s | x plain |",
              "|---|---|---|---|---|---|"]
    for record in records:
        if record.get("kind") not in ("reference", "half_plain_peak"):
            continue
        reference = _reference(records, record["model"])
        ratio = "-"
        if record.get("images_per_s") and reference.get("images_per_s"):
            ratio = f"{record['images_per_s'] / reference['images_per_s']:.2f}"
        run = "plain, no budget" if record["kind"] == "reference" else "vmem-auto"
        lines.append(f"| {record['model']} | {run} | {_mib(record.get('budget'))} | "
                     f"{_mib(record.get('peak_allocated'))} | {_speed(record)} | {ratio} |"
                     if record["status"] == "ok" else
                     f"| {record['model']} | {run} | {_mib(record.get('budget'))} | "
                     f"{record['status']} | - | - |")
    lines += ["", f"## Throughput at batch {first.get('batch')}", "",
              "| model | budget | method | status | peak allocated | peak reserved | img/s | "
              "x plain | offloaded/step | link GB/s | bound ms | transfer hidden | "
              "simulated ms | simulated vs measured |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for record in records:
        if record.get("kind") != "throughput":
            continue
        reference = _reference(records, record["model"])
        ratio = "-"
        if record.get("images_per_s") and reference.get("images_per_s"):
            ratio = f"{record['images_per_s'] / reference['images_per_s']:.2f}"
        bound, hidden = _bound(record, reference, spec)
        lines.append(
            f"| {record['model']} | {_mib(record['budget'])} | {record['method']} | "
            f"{record['status']} | {_mib(record.get('peak_allocated'))} | "
            f"{_mib(record.get('peak_reserved'))} | {_speed(record)} | {ratio} | "
            f"{_mib(record.get('offloaded_bytes'))} | {_link(record)} | {bound} | {hidden} | "
            f"{_predicted(record)} |")
    lines += _auto_against_fixed(records)
    searches = [r for r in records if r.get("kind") == "max_batch"]
    if searches:
        lines += ["", "## Largest batch that trains (3 steps) under the budget", "",
                  "| model | budget | method | max batch | runs |", "|---|---|---|---|---|"]
        unavailable = {r["method"] for r in records if r["status"] == "unavailable"}
        for r in searches:
            largest = "unavailable" if r["method"] in unavailable else r["max_batch"]
            lines.append(f"| {r['model']} | {_mib(r['budget'])} | {r['method']} | "
                         f"{largest} | {r['runs']} |")
        lines += ["", _ratios(searches)]
    unavailable = {r["method"]: r.get("message", "") for r in records
                   if r["status"] == "unavailable" and r.get("message")}
    for method, why in unavailable.items():
        lines += ["", f"{method}: unavailable ({why})"]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    if plots:
        _plots(records, out)
    return text


def _ratios(searches: list[dict]) -> str:
    rows = []
    for r in searches:
        if r["method"] != "vmem-auto" or not r["max_batch"]:
            continue
        for peer in ("plain", "save_on_cpu"):
            other = next((s for s in searches if s["method"] == peer and
                          s["model"] == r["model"] and s["budget"] == r["budget"]), None)
            if other and other["max_batch"]:
                rows.append(f"{r['model']} at {_mib(r['budget'])}: vmem-auto's max batch is "
                            f"{r['max_batch'] / other['max_batch']:.2f}x {peer}'s")
    return "\n".join(f"- {row}" for row in rows)


def _plots(records: list[dict], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: pip install matplotlib (the 'bench' extra)")
        return
    for model in sorted({r["model"] for r in records}):
        runs = [r for r in records if r["model"] == model]
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
        for method in sorted({r["method"] for r in runs if r.get("kind") == "throughput"}):
            points = sorted((r["budget"] / 2**20, r.get("images_per_s") or 0) for r in runs
                            if r.get("kind") == "throughput" and r["method"] == method)
            axes[0].plot(*zip(*points, strict=True), marker="o", label=method)
        axes[0].set(title=f"{model}: throughput vs budget", xlabel="budget (MiB)",
                    ylabel="images/s (0: does not fit)")
        axes[0].legend(fontsize=7)
        searches = [r for r in runs if r.get("kind") == "max_batch"]
        if searches:
            methods = sorted({r["method"] for r in searches})
            budgets = sorted({r["budget"] for r in searches})
            width = 0.8 / len(budgets)
            for i, budget in enumerate(budgets):
                values = [next((r["max_batch"] for r in searches if r["method"] == m and
                                r["budget"] == budget), 0) for m in methods]
                axes[1].bar([k + i * width for k in range(len(methods))], values, width,
                            label=_mib(budget))
            axes[1].set_xticks([k + 0.4 - width / 2 for k in range(len(methods))], methods,
                               rotation=30, fontsize=7)
            axes[1].set(title="max batch per method", ylabel="batch")
            axes[1].legend(fontsize=7)
        for r in runs:
            if r.get("memory_curve") and r.get("kind") in ("reference", "half_plain_peak"):
                label = "plain" if r["kind"] == "reference" else \
                    f"vmem-auto, budget {_mib(r['budget'])}"
                curve = r["memory_curve"]
                axes[2].plot([i / len(curve) for i in range(len(curve))],
                             [b / 2**20 for b in curve], label=label)
        axes[2].set(title="device memory over one training step",
                    xlabel="progress through the step (operators)", ylabel="MiB in use")
        axes[2].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"{model}.png", dpi=90)
        plt.close(fig)


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
