"""The benchmark pipeline end to end (``python -m bench --smoke``), on whatever device."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_sweep_writes_a_valid_table(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    [folder] = list(tmp_path.iterdir())
    records = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == {"reference", "half_plain_peak", "throughput"}
    by_method = {(r["method"], r.get("budget")): r for r in records if r["kind"] == "throughput"}
    assert len(by_method) == 2 * 4  # two budgets x four methods
    for record in records:
        assert record["status"] in {"ok", "oom", "too_small", "unavailable"}, record
        if record["status"] == "ok" and record.get("budget"):
            assert record["peak_allocated"] <= record["budget"]  # the cap held
    half = next(r for r in records if r["kind"] == "half_plain_peak")
    assert half["status"] == "ok" and half["peak_allocated"] <= half["budget"]
    table = (folder / "results.md").read_text()
    assert "| model | budget | method | status |" in table
    vmem_runs = [r for r in by_method.values() if r["method"].startswith("vmem-")
                 and r["status"] == "ok"]
    assert vmem_runs and all(r["predicted_ms"] > 0 and Path(r["trace"]).is_file()
                             for r in vmem_runs)
    assert "## vmem-auto against the best fixed policy" in table
    rows = table.split("## vmem-auto against")[0]  # that section repeats the model per budget
    assert rows.count("| resnet20 |") == len(records)
