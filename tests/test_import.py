"""Importing vmem must not touch CUDA (PyTorch's own rule: importing is free)."""

import subprocess
import sys

PROBE = """
import torch
import torch.cuda

def refuse(*args, **kwargs):
    raise AssertionError("CUDA was initialised during import")

torch.cuda._lazy_init = refuse
torch.cuda.init = refuse
import vmem, vmem.cli, vmem.demo, vmem.meter, vmem.preprocessing, vmem.preprocessing.hardware
assert not torch.cuda.is_initialized()
print("ok")
"""


def test_import_does_not_initialise_cuda():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_public_api():
    import vmem

    assert set(vmem.__all__) == {"session", "Config", "Plan", "BudgetTooSmall", "OutOfBudget",
                                 "models"}
    for name in vmem.__all__:
        assert getattr(vmem, name) is not None
