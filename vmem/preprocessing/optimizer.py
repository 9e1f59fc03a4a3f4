"""What an optimizer adds to device memory: its state, and its step's peak.

The optimizer is rebuilt on ``meta`` copies of its parameters (same class, same groups and
hyper-parameters) and stepped once under the meter, so state layouts and the temporaries of
``foreach`` kernels are measured, not guessed, and nothing is allocated.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from ..meter import EmulatedMeter

__all__ = ["OptimizerProfile", "profile_optimizer"]

log = logging.getLogger("vmem")


@dataclasses.dataclass(frozen=True)
class OptimizerProfile:
    state_bytes: int  # optimizer state held across steps (e.g. SGD momentum buffers)
    step_peak: int  # device peak during step(): parameters, gradients, state, temporaries


def profile_optimizer(optimizer: torch.optim.Optimizer) -> OptimizerProfile:
    """Measure ``optimizer`` by stepping a meta-device copy of it once.

    Example::

        >>> net = torch.nn.Linear(256, 256)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        >>> profile_optimizer(opt).state_bytes == 4 * (256 * 256 + 256)
        True
    """
    meta: dict[torch.Tensor, torch.Tensor] = {}
    groups = []
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            if p not in meta:
                meta[p] = torch.empty_like(p, device="meta").requires_grad_(p.requires_grad)
            params.append(meta[p])
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
    try:
        copy = type(optimizer)(groups)  # every group carries all its hyper-parameters
        with EmulatedMeter(torch.device("meta")) as meter:
            meter.track(meta.values())
            for p in meta.values():
                if p.requires_grad:
                    p.grad = torch.empty_like(p)
            copy.step()
        state = sum(t.untyped_storage().nbytes() for s in copy.state.values()
                    for t in s.values() if isinstance(t, torch.Tensor) and t.device.type == "meta")
        return OptimizerProfile(state_bytes=state, step_peak=meter.peak)
    except Exception as err:  # an optimizer that cannot run on meta: assume Adam-like state
        params = sum(p.numel() * p.element_size() for p in meta)
        log.warning("vmem: could not measure %s on the meta device (%s); assuming its state "
                    "is twice the parameters", type(optimizer).__name__, err)
        return OptimizerProfile(state_bytes=2 * params, step_peak=5 * params)
