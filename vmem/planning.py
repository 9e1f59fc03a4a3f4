"""Plan a model for a budget: profile it, plan the offloads, and split feature maps when no
offload plan fits. The session plans through this; so does ``python -m vmem plan``.

With the hardware given, ``auto`` is the fastest on the timeline simulator of a few whole
plans: its own offload plan (the greedy prefix, :mod:`vmem.control.planner`), every fixed
policy's (``vdnn_conv``, ``vdnn_all``, ``recompute``), recomputation of every run with
``auto``'s offloads of what remains (offload a run's input, recompute its inside), and the
same two with only the runs' cheap layers recomputed (BatchNorm and activation outputs,
the memory-efficient DenseNet idea: no convolution runs twice). Each is
one profile at most and a simulation of a few milliseconds, and the choice is never slower,
simulated, than any fixed policy that fits: the guarantee a search over a richer space
(per-tensor dynamic programming, an ILP) would have to earn its cost against.

It joins the three modules (preprocessing profiles, control decides, and feed-forward's
split runs are installed while a split model is profiled) without running a training step.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from .control import Plan, make_plan
from .control.splitting import MAX_PARTS, choose_splits, decisions
from .errors import BudgetTooSmall, format_bytes
from .feedforward.recompute import cheap_stretches
from .feedforward.split_runs import Splits, find_runs
from .feedforward.stream import ShapeStash
from .preprocessing import NetworkProfile, profile_network
from .preprocessing.hardware import HardwareSpec
from .preprocessing.optimizer import OptimizerProfile

__all__ = ["CannotProfile", "Planned", "plan_model", "TIE"]

TIE = 1e-9  # relative difference in simulated time below which two plans tie

log = logging.getLogger("vmem")


class CannotProfile(RuntimeError):
    """The model's step cannot run shape-only (data-dependent control flow, ``.item()``)."""


class Planned(NamedTuple):
    plan: Plan  # its ``splits`` name the runs to split or recompute
    profile: NetworkProfile | None  # of the model with those runs installed (None: the
    # model could not run shape-only, and the plan offloads every tracked save)


def plan_model(model: nn.Module, args: tuple, kwargs: dict | None = None, *,
               budget: int | None, policy: str, headroom: tuple[float, int],
               optimizer: OptimizerProfile | None = None, gradients_held: bool = False,
               prefetch_distance: int | None = None, max_parts: int = MAX_PARTS,
               top_level_runs: bool = True, spec: HardwareSpec | None = None,
               retime: Callable[[NetworkProfile], NetworkProfile] | None = None,
               compress: bool = False, outside_bytes: int = 0, forwards: int = 1) -> Planned:
    """The plan for one training step of ``model(*args, **kwargs)`` (its ``splits``: the
    runs it splits or recomputes, none when offloading suffices) and the profile of the model
    with those runs installed.

    ``policy``: ``auto``, ``none``, ``vdnn_all``, ``vdnn_conv``, ``recompute`` (every run
    recomputed in backward, nothing offloaded) or ``split_approx``; only ``auto`` and
    ``split_approx`` split, and only up to ``max_parts`` parts (1: never).
    ``top_level_runs``: whether runs that are children of ``model`` itself may be split (not
    when planning inside the model's own forward pre-hook, as the session does: its forward
    has already been looked up). ``spec``: the hardware, for the timeline simulator (see
    the module docstring); without it ``auto`` is its offload plan alone. ``retime``: gives
    each profile made here its layer times (the session's measured ones,
    :mod:`vmem.refinement`); without it they are the shape-only profile's estimates.
    ``compress``: the transfer backend compresses and ``outside_bytes`` are device bytes in
    use that the profile does not see (see :func:`vmem.control.make_plan`); ``forwards``:
    forwards of the same inputs in one step, before its backward.

    Raises:
        vmem.BudgetTooSmall: no plan fits; its ``minimum`` is the smallest budget that does
            with splitting, where splitting is allowed.

    Example::

        >>> import torch, vmem
        >>> with torch.device("meta"):
        ...     model = vmem.models.vgg11()
        >>> x = torch.empty(32, 3, 128, 128, device="meta")  # plain: 1.46 GiB
        >>> plan, _ = plan_model(model, (x,), budget=5 * 2**28, policy="auto",
        ...                      headroom=(0.02, 0))  # offloading alone: 1.43 GiB
        >>> [split.parts for split in plan.splits], plan.predicted_peak <= 5 * 2**28
        ([4, 2, 2, 2, 2], True)
    """
    approximate = policy == "split_approx"
    kwargs = kwargs or {}
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)

    def profile_of(choices: dict):
        with Splits(model, choices, approximate, ShapeStash()):
            try:
                profile = profile_network(model, inputs=args, kwargs=kwargs, dtype=dtype,
                                          name=type(model).__name__, forwards=forwards,
                                          gradients_held=gradients_held)
            except Exception as error:  # noqa: BLE001 -- the model's own code failed
                raise CannotProfile(f"{type(error).__name__}: {error}") from error
        return profile if retime is None else retime(profile)

    def plan_of(profile, offload_policy: str = "auto" if approximate else policy):
        plan = make_plan(profile, budget=budget, policy=offload_policy,
                         prefetch_distance=prefetch_distance, optimizer=optimizer,
                         gradients_held=gradients_held, headroom=headroom, spec=spec,
                         compress=compress, outside_bytes=outside_bytes)
        return dataclasses.replace(plan, forwards=forwards)

    unsplit = profile_of({})
    # Runs inside the model's own checkpoint recompute already: never again, nor split.
    runs = [run for run in find_runs(model) if (top_level_runs or run.container)
            and run.container not in unsplit.foreign]
    cheap_runs = [run for run in runs if cheap_stretches(run.layers(model))]
    profiles: dict[int, NetworkProfile] = {}  # per recompute mode, profiled when first asked

    def recompute(offload_policy: str, parts: int = 1) -> Planned:
        """Every run recomputed (``parts`` 1) or the cheap layers of those that have some
        (0), the rest planned by ``offload_policy``."""
        choices = {run: (parts, 0) for run in (runs if parts else cheap_runs)}
        if parts not in profiles:
            profiles[parts] = profile_of(choices)
        plan = plan_of(profiles[parts], offload_policy)
        plan = dataclasses.replace(plan, policy="recompute" if offload_policy == "none" else
                                   plan.policy,
                                   splits=decisions(choices, unsplit, profiles[parts]))
        return Planned(plan, profiles[parts])

    if policy == "recompute":
        if not runs:
            raise ValueError(
                f"policy='recompute': {type(model).__name__} has no run of convolution "
                "layers to recompute (runs are stretches of an nn.Sequential submodule, "
                "starting at a Conv2d); use policy='auto' or 'vdnn_conv'")
        return recompute("none")
    if policy == "auto" and spec is not None:
        attempts = {"auto": lambda: Planned(plan_of(unsplit), unsplit),
                    "vdnn_conv": lambda: Planned(plan_of(unsplit, "vdnn_conv"), unsplit),
                    "vdnn_all": lambda: Planned(plan_of(unsplit, "vdnn_all"), unsplit)}
        if runs:
            attempts["recompute"] = lambda: recompute("none")
            attempts["recompute + auto"] = lambda: recompute("auto")
        if cheap_runs:
            attempts["cheap recompute"] = lambda: recompute("none", parts=0)
            attempts["cheap recompute + auto"] = lambda: recompute("auto", parts=0)
        candidates = {}
        for name, attempt in attempts.items():
            try:
                candidates[name] = attempt()
            except BudgetTooSmall:
                pass
            except CannotProfile as error:  # the model as is ran: only this candidate fails
                log.info("vmem: auto leaves out the %s plan: %s", name, error)
        if candidates:  # the fastest; on a tie (to rounding) the first, the least changed
            best = min(c.plan.predicted_seconds for c in candidates.values())
            name = next(n for n, c in candidates.items()
                        if c.plan.predicted_seconds <= best * (1 + TIE))
            log.info("vmem: auto takes the %s plan, %s", name, ", ".join(
                f"{n} {c[0].predicted_seconds * 1e3:.1f} ms" for n, c in candidates.items()))
            plan, profile = candidates[name]
            return Planned(dataclasses.replace(plan, policy="auto"), profile)
    try:
        return Planned(plan_of(unsplit), unsplit)
    except BudgetTooSmall:
        if policy not in ("auto", "split_approx") or not runs or max_parts < 2:
            raise
    log.info("vmem: offloading alone does not fit %s; choosing feature-map splits",
             format_bytes(budget))
    first = next((t for t in args if isinstance(t, torch.Tensor)), None)
    batch = 0 if approximate or first is None or not first.dim() else first.shape[0]
    plan, _, profile = choose_splits(runs, profile_of, plan_of, unsplit, batch, max_parts)
    return Planned(dataclasses.replace(plan, approximate=approximate), profile)
