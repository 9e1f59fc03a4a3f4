"""How many parts to split each run into (mmCNN's Self Part Number), when offloading is not
enough.

Splitting a run divides its working set by about the number of parts but recomputes it in
backward, so the planner splits only when no offload plan fits, and no more than needed.
It profiles the model with every run in 2, 4, 8 ... parts (up to ``MAX_PARTS``) until a plan
fits. A split run saves only its input, so what one run holds at its peak hardly depends on
how the others are split: each run then gets the fewest parts, among those profiled, whose
Memmax is within the plan's target (later runs work on smaller maps and need fewer), and
one more profile checks that mix, falling back to the uniform split if it does not fit.
Every check is a shape-only profile of the model with those splits and a plan of it, so the
memory the split runs really allocate (parts, halos, BatchNorm's passes) is what is checked.

The axis: the batch when it has at least as many samples as parts (no halo, nothing
recomputed twice), else the height; the height always in the approximate mode.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import torch

from ..errors import BudgetTooSmall
from ..preprocessing.profile import NetworkProfile
from .plan import Plan, SplitDecision

__all__ = ["MAX_PARTS", "choose_splits", "decisions", "run_memmax"]

log = logging.getLogger("vmem")

MAX_PARTS = 32

Profiler = Callable[[dict], NetworkProfile]  # {run: (parts, axis)} -> the model's profile
Planner = Callable[[NetworkProfile], Plan]  # raises BudgetTooSmall when no plan fits


def _axis(parts: int, batch: int) -> int:
    return 0 if parts <= batch else 2


def run_memmax(profile: NetworkProfile, names: set[str]) -> int:
    """Peak device bytes (nothing offloaded) over the operators of the layers ``names``."""
    wanted = {layer.index for layer in profile.layers if layer.name in names}
    timeline = profile.timeline
    return max((m for m, layer in zip(timeline.memory, timeline.layer, strict=True)
                if layer in wanted), default=0)


def _run_layers(run, parts: int) -> set[str]:
    return {run.module_name} if parts > 1 else set(run.layer_names())


def _streamed_bytes(profile: NetworkProfile, name: str) -> int:
    """A split run's input bytes, which stream through the host pool, unless the run is the
    model's first layer (its input is the caller's, and stays)."""
    layer = next(layer for layer in profile.layers if layer.name == name)
    if layer.index == 0:
        return 0
    return math.prod(layer.input_shapes[0]) * \
        torch.empty(0, dtype=getattr(torch, layer.input_dtypes[0])).element_size()


def choose_splits(runs: list, profile_of: Profiler, plan_of: Planner, unsplit: NetworkProfile,
                  batch: int, max_parts: int = MAX_PARTS
                  ) -> tuple[Plan, dict, NetworkProfile]:
    """The plan with the fewest parts that fits, its choices ``{run: (parts, axis)}`` and
    the profile of the model so split.

    ``runs``: :class:`vmem.feedforward.split_runs.Run` of the model, in order;
    ``profile_of`` profiles the model split as chosen; ``plan_of`` plans a profile, raising
    :class:`vmem.BudgetTooSmall` when the plan does not fit; ``unsplit``: the profile without
    splits; ``batch``: the input's batch size, or 0 to split along the height only
    (Split-CNN's approximate mode, whose patches are spatial).

    Raises:
        vmem.BudgetTooSmall: not even ``max_parts`` parts fit; its ``minimum`` is that
            plan's, which splitting has lowered.
    """
    if not runs:
        raise ValueError("no run of layers can be split in this model")
    if max_parts < 2:
        raise ValueError(f"max_parts={max_parts}: splitting needs at least 2 parts")
    profiles, parts = {1: unsplit}, 2
    while True:
        choices = {run: (parts, _axis(parts, batch)) for run in runs}
        log.info("vmem: profiling with every run in %d parts", parts)
        profiles[parts] = profile = profile_of(choices)
        try:
            plan = plan_of(profile)
            break
        except BudgetTooSmall as too_small:
            if parts * 2 > max_parts:
                raise too_small from None
        parts *= 2
    fewest = {}
    for run in runs:
        fits = [p for p in sorted(profiles)
                if run_memmax(profiles[p], _run_layers(run, p)) <= plan.target]
        fewest[run] = min(fits, default=parts)
    mixed = {run: (p, _axis(p, batch)) for run, p in fewest.items() if p > 1}
    if mixed != choices:
        mixed_profile = profile_of(mixed)
        try:
            plan, profile, choices = plan_of(mixed_profile), mixed_profile, mixed
        except BudgetTooSmall:
            pass  # the uniform split fits
    return dataclasses.replace(plan, splits=decisions(choices, unsplit, profile)), choices, \
        profile


def decisions(choices: dict, unsplit: NetworkProfile,
              profile: NetworkProfile) -> list[SplitDecision]:
    """What the plan reports of each chosen run: parts, axis, Memmax in ``unsplit`` and in
    ``profile`` (the model so split), the bytes its input streams through the host."""
    return [SplitDecision(run.name, p, axis, run_memmax(unsplit, _run_layers(run, 1)),
                          run_memmax(profile, {run.module_name}),
                          _streamed_bytes(profile, run.module_name) if p > 1 else 0)
            for run, (p, axis) in choices.items()]
