"""Plan a model for a budget: profile it, plan the offloads, and split feature maps when no
offload plan fits. The session plans through this; so does ``python -m vmem plan``.

It joins the three modules (preprocessing profiles, control decides, and feed-forward's
split runs are installed while a split model is profiled) without running a training step.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from .control import Plan, make_plan
from .control.splitting import MAX_PARTS, choose_splits, decisions
from .errors import BudgetTooSmall, format_bytes
from .feedforward.split_runs import Splits, find_runs
from .feedforward.stream import ShapeStash
from .preprocessing import profile_network
from .preprocessing.optimizer import OptimizerProfile

__all__ = ["plan_model"]

log = logging.getLogger("vmem")


def plan_model(model: nn.Module, args: tuple, kwargs: dict | None = None, *,
               budget: int | None, policy: str, headroom: tuple[float, int],
               optimizer: OptimizerProfile | None = None, gradients_held: bool = False,
               prefetch_distance: int | None = None, max_parts: int = MAX_PARTS,
               top_level_runs: bool = True) -> tuple[Plan, dict]:
    """The plan for one training step of ``model(*args, **kwargs)`` and the split choices
    ``{run: (parts, axis)}`` it needs (empty when offloading suffices).

    ``policy``: ``auto``, ``none``, ``vdnn_all``, ``vdnn_conv``, ``recompute`` (every run
    recomputed in backward, nothing offloaded) or ``split_approx``; only ``auto`` and
    ``split_approx`` split, and only up to ``max_parts`` parts (1: never).
    ``top_level_runs``: whether runs that are children of ``model`` itself may be split (not
    when planning inside the model's own forward pre-hook, as the session does: its forward
    has already been looked up).

    Raises:
        vmem.BudgetTooSmall: no plan fits; its ``minimum`` is the smallest budget that does
            with splitting, where splitting is allowed.

    Example::

        >>> import torch, vmem
        >>> with torch.device("meta"):
        ...     model = vmem.models.vgg11()
        >>> x = torch.empty(32, 3, 128, 128, device="meta")  # plain: 1.46 GiB
        >>> plan, choices = plan_model(model, (x,), budget=5 * 2**28, policy="auto",
        ...                            headroom=(0.02, 0))  # offloading alone: 1.43 GiB
        >>> [parts for parts, axis in choices.values()], plan.predicted_peak <= 5 * 2**28
        ([4, 2, 2, 2, 2], True)
    """
    approximate = policy == "split_approx"
    kwargs = kwargs or {}
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)

    def profile_of(choices: dict):
        with Splits(model, choices, approximate, ShapeStash()):
            return profile_network(model, inputs=args, kwargs=kwargs, dtype=dtype,
                                   name=type(model).__name__)

    def plan_of(profile):
        return make_plan(profile, budget=budget, policy="auto" if approximate else policy,
                         prefetch_distance=prefetch_distance, optimizer=optimizer,
                         gradients_held=gradients_held, headroom=headroom)

    unsplit = profile_of({})
    if policy == "recompute":
        choices = {run: (1, 0) for run in find_runs(model) if top_level_runs or run.container}
        profile = profile_of(choices)
        plan = make_plan(profile, budget=budget, policy="none", optimizer=optimizer,
                         gradients_held=gradients_held, headroom=headroom)
        return dataclasses.replace(plan, policy=policy,
                                   splits=decisions(choices, unsplit, profile)), choices
    try:
        return plan_of(unsplit), {}
    except BudgetTooSmall:
        runs = [run for run in find_runs(model) if top_level_runs or run.container]
        if policy not in ("auto", "split_approx") or not runs or max_parts < 2:
            raise
    log.info("vmem: offloading alone does not fit %s; choosing feature-map splits",
             format_bytes(budget))
    first = next((t for t in args if isinstance(t, torch.Tensor)), None)
    batch = 0 if approximate or first is None or not first.dim() else first.shape[0]
    plan, choices = choose_splits(runs, profile_of, plan_of, unsplit, batch, max_parts)
    return dataclasses.replace(plan, approximate=approximate), choices
