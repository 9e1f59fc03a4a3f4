"""Shared test set-up: the ``gpu`` marker skips a test where CUDA is not available."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

# Regenerates a fixture where torchvision imports; not a test module.
collect_ignore = ["models/make_torchvision_reference.py"]
