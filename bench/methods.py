"""The training methods compared, each as a context around an unchanged training step.

Peers are used as their documentation says: ``torch.autograd.graph.save_on_cpu(pin_memory=
True)``; ``torch.utils.checkpoint.checkpoint_sequential`` with sqrt(n) segments and
``use_reentrant=False``; torchtune's ``OffloadActivations`` only if torchtune imports.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

import vmem

METHODS = ["plain", "save_on_cpu", "checkpoint", "torchtune", "vmem-vdnn_all",
           "vmem-vdnn_conv", "vmem-recompute", "vmem-auto"]
FIXED_POLICIES = ["vmem-vdnn_all", "vmem-vdnn_conv", "vmem-recompute"]  # what auto must beat


class Unavailable(Exception):
    """The method cannot run here (say why); reported, never faked."""


def as_sequential(model: nn.Module) -> nn.Sequential:
    """The model as a flat ``nn.Sequential`` (what ``checkpoint_sequential`` takes): VGG's
    layers, or ResNet's stem layers and residual blocks one by one, so that sqrt(n) segments
    cut the network as a user would."""
    if hasattr(model, "features") and hasattr(model, "classifier"):  # VGG
        return nn.Sequential(*model.features, model.avgpool, nn.Flatten(1), *model.classifier)
    if hasattr(model, "fc") and hasattr(model, "avgpool"):  # ResNet (torchvision's or ours)
        body = []
        for name, child in model.named_children():
            if name in ("avgpool", "fc"):
                continue
            body += list(child) if isinstance(child, nn.Sequential) else [child]
        return nn.Sequential(*body, model.avgpool, nn.Flatten(1), model.fc)
    raise Unavailable(f"no sequential form of {type(model).__name__}")


class Method:
    """``forward(x)`` under the method; ``context`` wraps the whole training loop."""

    def __init__(self, name: str, model: nn.Module, optimizer, budget: int | None,
                 device: torch.device) -> None:
        self.name, self.model, self.device = name, model, device
        self.context = contextlib.nullcontext()
        self.session = None
        if name.startswith("vmem-"):
            self.session = vmem.session(model, optimizer=optimizer, budget=budget,
                                        policy=name.removeprefix("vmem-"))
            self.context = self.session
        elif name == "checkpoint":
            self.sequential = as_sequential(model)
            self.segments = max(1, round(math.sqrt(len(self.sequential))))
        elif name == "torchtune":
            try:
                from torchtune.training import OffloadActivations
            except Exception as err:  # not installed, or does not import against this torch
                raise Unavailable(f"torchtune does not import: {err}") from None
            self.offloader = OffloadActivations
        elif name not in ("plain", "save_on_cpu"):
            raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.name == "save_on_cpu":
            pin = self.device.type == "cuda"  # pinning needs CUDA; on the CPU it is a no-op
            with torch.autograd.graph.save_on_cpu(pin_memory=pin):
                return self.model(x)
        if self.name == "checkpoint":
            return torch.utils.checkpoint.checkpoint_sequential(
                self.sequential, self.segments, x, use_reentrant=False)
        if self.name == "torchtune":
            with self.offloader():
                return self.model(x)
        return self.model(x)

    def transfer_stats(self) -> dict:
        """Bytes the method moved per step (vmem's own counters; None for the peers)."""
        if self.session is None or self.session.executor is None:
            return {"offloaded_bytes": None, "prefetched_bytes": None}
        steps = max(self.session.steps, 1)
        executor = self.session.executor
        report = self.session.report_dict()
        return {"offloaded_bytes": executor.offloaded_bytes // steps,
                "prefetched_bytes": executor.prefetched_bytes // steps,
                "predicted_peak": self.session.plan.predicted_peak,
                # the plan in force on the simulator, with measured layer times once refined
                "predicted_ms": self.session.simulation().iteration_s * 1e3,
                "offloaded_tensors": self.session.plan.offloaded,
                "compressed_saves": report["compressed_saves"], "backend": report["backend"],
                "refinement": report["refinement"]}
