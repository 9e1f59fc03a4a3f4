import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vmem.cli import main


def test_profile_prints_the_table_and_totals(capsys):
    assert main(["profile", "--model", "resnet18", "--batch", "4", "--image-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "layer1.0.add_" in out and "predicted plain peak" in out and "saved activations" in out


def test_profile_json_is_machine_readable(capsys):
    main(["profile", "--model", "vgg11", "--batch", "2", "--image-size", "32", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "vgg11" and data["input_shape"] == [2, 3, 32, 32]
    assert data["peak_bytes"] > data["param_bytes"] and data["totals"]["saved_bytes"] > 0


def test_plan_splits_where_offloading_alone_cannot_fit(capsys):
    argv = ["plan", "--model", "vgg11", "--batch", "32", "--image-size", "128",
            "--optimizer", "none", "--device", "cpu"]
    assert main([*argv, "--budget", "1.25GiB"]) == 0  # offloading alone: 1.43 GiB
    out = capsys.readouterr().out
    assert "runs split or recomputed, exact" in out and "features[0:3]" in out
    assert "predicted peak" in out
    main([*argv, "--budget", "1.25GiB", "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert plan["splits"] and plan["predicted_peak"] <= plan["target"]
    main([*argv, "--budget", "2GiB", "--json"])
    assert not json.loads(capsys.readouterr().out)["splits"]  # it fits without splitting


@pytest.mark.parametrize("argv, message", [
    (["profile", "--model", "resnet51"], "unknown model 'resnet51'"),
    (["profile", "--model", "vgg16", "--batch", "0"], "--batch: '0' is not a positive integer"),
    (["profile", "--model", "vgg16", "--image-size", "x"], "--image-size: 'x'"),
    (["profile", "--model", "vgg16", "--image-size", "8"], "cannot run on input"),
    (["profile", "--model", "vgg16", "--device", "tpu9"], "is not a device"),
    (["plan", "--model", "vgg11", "--batch", "2", "--budget", "0.5"], "give bytes or a size"),
    (["plan", "--model", "vgg11", "--batch", "2", "--budget", "lots"], "is not a size"),
    (["plan", "--model", "vgg11", "--batch", "32", "--image-size", "128", "--budget", "1.25GiB",
      "--split", "1", "--device", "cpu", "--optimizer", "none"], "is too small"),
])
def test_bad_input_is_one_line_and_exit_code_2(argv, message):
    result = subprocess.run([sys.executable, "-m", "vmem", *argv], capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_demo_trains_within_half_the_plain_peak(capsys):
    assert main(["demo", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "budget: half of that" in out and "Memmax" in out and "measured peak" in out
    assert re.search(r"within the budget [\d.]+ MiB: True", out)
    assert "weights bit-identical to plain: True" in out


@pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists(),
                    reason="nvcc not found")
def test_build_native_reports_what_it_sees(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("VMEM_CACHE_DIR", str(tmp_path))
    assert main(["build-native"]) == 0
    out = capsys.readouterr().out
    assert f"built {tmp_path}" in out
    devices = "CUDA device(s)" if torch.cuda.is_available() else "no CUDA device ("
    assert devices in out and "torch" in out.splitlines()[-1]
