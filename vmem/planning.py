"""Plan a model for a budget: profile it, plan the offloads, and split feature maps when no
offload plan fits. The session plans through this; so does ``python -m vmem plan``.

With the hardware given, ``auto`` is the fastest on the timeline simulator of a few whole
plans: its own offload plan (the greedy prefix, :mod:`vmem.control.planner`), every fixed
policy's (``vdnn_conv``, ``vdnn_all``, ``recompute``: the blocks whose recomputation
lowers the peak most, with ``auto``'s offloads of what remains: offload a block's input,
recompute its inside), the set of blocks (:mod:`vmem.control.blocks`, one greedy order per
depth of the module tree) whose plan simulates fastest on the profile without them, and
``auto`` or nothing else with only the runs' cheap layers recomputed (BatchNorm and
activation outputs, the memory-efficient DenseNet idea: no convolution runs twice). Each
is one profile at most, and the choice is never slower, simulated, than any fixed policy
that fits.

It joins the three modules (preprocessing profiles, control decides, and feed-forward's
split runs are installed while a split model is profiled) without running a training step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from .control import Plan, make_plan
from .control.blocks import find_blocks, recompute_order
from .control.plan import OFFLOAD, RecomputeDecision
from .control.simulator import op_seconds
from .control.splitting import MAX_PARTS, choose_splits, decisions
from .errors import BudgetTooSmall, format_bytes
from .feedforward.blocks import Recomputation, stretch_of
from .feedforward.recompute import cheap_stretches
from .feedforward.split_runs import Splits, find_runs
from .feedforward.stream import ShapeStash
from .preprocessing import NetworkProfile, profile_network
from .preprocessing.hardware import HardwareSpec, emulated_spec
from .preprocessing.optimizer import OptimizerProfile

__all__ = ["CannotProfile", "Planned", "plan_model", "TIE"]

TIE = 1e-9  # relative difference in simulated time below which two plans tie
FAMILIES = 2  # families of blocks (see plan_model) whose sets auto times, lowest peak first
TRIES = 3  # sets of blocks profiled, when none fits, for the one that needs least

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

    def profile_of(choices: dict, recomputed=()):
        with Splits(model, choices, approximate, ShapeStash()), \
                Recomputation(model, [block.name for block in recomputed]):
            try:
                profile = profile_network(model, inputs=args, kwargs=kwargs, dtype=dtype,
                                          name=type(model).__name__, forwards=forwards,
                                          gradients_held=gradients_held)
            except Exception as error:  # noqa: BLE001 -- the model's own code failed
                raise CannotProfile(f"{type(error).__name__}: {error}") from error
        return profile if retime is None else retime(profile)

    def plan_of(profile, offload_policy: str = "auto" if approximate else policy, **extra):
        plan = make_plan(profile, budget=budget, policy=offload_policy,
                         prefetch_distance=prefetch_distance, optimizer=optimizer,
                         gradients_held=gradients_held, headroom=headroom, spec=spec,
                         compress=compress, outside_bytes=outside_bytes, **extra)
        return dataclasses.replace(plan, forwards=forwards)

    unsplit = profile_of({})
    # Runs inside the model's own checkpoint recompute already: never again, nor split.
    runs = [run for run in find_runs(model) if (top_level_runs or run.container)
            and run.container not in unsplit.foreign]
    cheap_runs = [run for run in runs if cheap_stretches(run.layers(model))]
    profiles: dict[int, NetworkProfile] = {}  # per cheap-recompute mode, profiled once
    def virtual(blocks) -> Plan:
        """The plan with ``blocks`` counted as recomputed, on the profile without them."""
        return plan_of(unsplit, "auto", recomputed=blocks, sweep=False)

    def bare_peak(blocks) -> int:
        """The predicted peak with ``blocks`` counted as recomputed, nothing offloaded."""
        return make_plan(unsplit, budget=None, policy="none", optimizer=optimizer,
                         gradients_held=gradients_held, outside_bytes=outside_bytes,
                         recomputed=blocks).predicted_peak

    blocks = find_blocks(unsplit, model_chain=_is_chain(model))
    # Families of blocks, each ordered greedily: every block, and those at each depth of
    # the module tree alone (stages, residual blocks, ...): the greedy never undoes a
    # stage it took for its blocks, so each depth gets its own try.
    seconds = op_seconds(unsplit, spec or emulated_spec())
    depths = sorted({_depth(b) for b in blocks})
    families = [recompute_order(unsplit, family, seconds) for family in
                [blocks, *([b for b in blocks if _depth(b) == d] for d in depths)]]
    families = sorted((sets for sets in families if sets),
                      key=lambda sets: bare_peak(sets[-1]))
    every_set = {tuple(b.name for b in blocks): blocks for sets in families for blocks in sets}
    families = families[:FAMILIES]
    sets = families[0] if families else []
    order = sets[-1] if sets else []  # the lowest peak recomputation reaches

    def cheap(offload_policy: str) -> Planned:
        """The cheap layers of every run that has some recomputed, the rest planned by
        ``offload_policy``."""
        choices = {run: (0, 0) for run in cheap_runs}
        if 0 not in profiles:
            profiles[0] = profile_of(choices)
        plan = plan_of(profiles[0], offload_policy)
        return Planned(dataclasses.replace(plan, splits=decisions(choices, unsplit,
                                                                  profiles[0])), profiles[0])

    def recompute(chosen: list) -> Planned:
        """The blocks ``chosen`` recomputed, what else the budget needs offloaded (their
        inputs among it: recompute inside, offload the boundary)."""
        profile = profile_of({}, chosen)
        plan = plan_of(profile, "auto")
        return Planned(dataclasses.replace(
            plan, policy=policy, recomputed=recompute_decisions(chosen, unsplit, plan)),
            profile)

    def recompute_policy() -> Planned:
        """``recompute``: the blocks of the lowest peak recomputed, or, where that plan
        does not fit, the set whose plan needs the least."""
        try:
            return recompute(order)
        except BudgetTooSmall as error:
            return least_needing(_without_frames(error))

    def least_needing(refusal: BudgetTooSmall) -> Planned:
        """The set of blocks whose plan needs the least budget: of every family's sets,
        the ``TRIES`` whose plans on the model without them need least, each profiled
        with them; raises the smallest refusal when none fits."""
        ranked = []
        for blocks in every_set.values():
            try:
                ranked.append((0, virtual(blocks).predicted_seconds, blocks))
            except BudgetTooSmall as error:
                ranked.append((error.minimum, 0.0, blocks))
        for _, _, blocks in sorted(ranked, key=lambda entry: entry[:2])[:TRIES]:
            try:
                return recompute(blocks)
            except BudgetTooSmall as error:
                refusal = min(refusal, _without_frames(error), key=lambda e: e.minimum)
        raise refusal

    if policy == "recompute":
        if not order:
            raise ValueError(
                f"policy='recompute': {type(model).__name__} has no block whose "
                "recomputation frees anything (a block is a submodule, or a stretch of an "
                "nn.Sequential, that saves tensors for backward); use policy='auto' or "
                "'vdnn_conv'")
        return recompute_policy()
    if policy == "auto" and spec is not None:
        attempts = {"auto": lambda: Planned(plan_of(unsplit), unsplit),
                    "vdnn_conv": lambda: Planned(plan_of(unsplit, "vdnn_conv"), unsplit),
                    "vdnn_all": lambda: Planned(plan_of(unsplit, "vdnn_all"), unsplit)}
        if order:
            attempts["recompute"] = recompute_policy
            chosen = min((_fastest_set(family, virtual) for family in families),
                         key=lambda found: found[1])[0]
            if chosen and chosen != order:
                attempts[f"{len(chosen)} blocks recomputed + auto"] = \
                    lambda: recompute(chosen)
        if cheap_runs:
            attempts["cheap recompute"] = lambda: cheap("none")
            attempts["cheap recompute + auto"] = lambda: cheap("auto")
        candidates, refusals = {}, []
        for name, attempt in attempts.items():
            try:
                candidates[name] = attempt()
            except BudgetTooSmall as error:
                refusals.append(_without_frames(error))
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
        if refusals and sets:  # the set of blocks whose plan needs least, verified
            try:
                planned = least_needing(min(refusals, key=lambda error: error.minimum))
                return Planned(dataclasses.replace(planned.plan, policy="auto"),
                               planned.profile)
            except BudgetTooSmall as error:
                refusals.append(_without_frames(error))
        if refusals and (not runs or max_parts < 2):  # the smallest any candidate needs
            raise min(refusals, key=lambda error: error.minimum)
    try:
        return Planned(plan_of(unsplit), unsplit)
    except BudgetTooSmall:
        if policy == "auto" and spec is None and order:  # without the hardware: recompute
            with contextlib.suppress(BudgetTooSmall, CannotProfile):
                return recompute(order)
        if policy not in ("auto", "split_approx") or not runs or max_parts < 2:
            raise
    log.info("vmem: offloading alone does not fit %s; choosing feature-map splits",
             format_bytes(budget))
    first = next((t for t in args if isinstance(t, torch.Tensor)), None)
    batch = 0 if approximate or first is None or not first.dim() else first.shape[0]
    plan, _, profile = choose_splits(runs, profile_of, plan_of, unsplit, batch, max_parts)
    return Planned(dataclasses.replace(plan, approximate=approximate), profile)


def _without_frames(error: BudgetTooSmall) -> BudgetTooSmall:
    """``error`` kept for later without its traceback nor the exceptions it was raised
    while handling: their frames reach up to the training loop's and hold its tensors."""
    error.__context__ = error.__cause__ = None
    return error.with_traceback(None)


def _depth(block) -> int:
    """How deep in the module tree ``block`` sits: 1 for a child of the model (a stretch
    of the model's own children too)."""
    return block.path.count(".") + 1 + ("[" in block.name and bool(block.path))


def _is_chain(model: nn.Module) -> bool:
    return isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward


def _fastest_set(sets: list, plan_with, points: int = 9) -> tuple[list, float]:
    """The set of blocks among ``sets`` (each one greedy move on from the one before, see
    :func:`~vmem.control.blocks.recompute_order`) whose plan, made on the model without
    them (``plan_with(blocks)``: raises BudgetTooSmall when it does not fit), is simulated
    fastest; among ``points`` sets evenly spread, then bisecting towards the best between
    its neighbours; with its simulated seconds. Empty when none fits (or recomputing
    nothing is fastest)."""
    timed: dict[int, float] = {}

    def time(k: int) -> float:  # k: how many moves; 0 recomputes nothing
        if k not in timed:
            try:
                timed[k] = plan_with(sets[k - 1] if k else []).predicted_seconds
            except BudgetTooSmall:
                timed[k] = float("inf")
        return timed[k]

    for k in sorted({round(len(sets) * i / (points - 1)) for i in range(points)}):
        time(k)
    best = min(timed, key=lambda k: (timed[k], k))
    step = max(1, len(sets) // (points - 1))
    while step > 1:
        step //= 2
        for k in (best - step, best + step):
            if 0 <= k <= len(sets):
                time(k)
        best = min(timed, key=lambda k: (timed[k], k))
    return ([] if timed[best] == float("inf") or not best else sets[best - 1]), timed[best]


def recompute_decisions(chosen: list, unsplit: NetworkProfile, plan: Plan
                        ) -> list[RecomputeDecision]:
    """What the plan reports of each recomputed block: the bytes it frees and the FLOPs it
    costs (in ``unsplit``, the profile without it), and whether its input is offloaded."""
    saves = unsplit.timeline.saves
    offloaded = {(d.key.module, d.key.ordinal) for d in plan.saves
                 if d.action == OFFLOAD and d.key is not None}
    decisions = []
    for block in chosen:
        stretch = stretch_of(block.name)  # the module whose call saves the block's input
        entry = block.name if stretch is None else \
            ".".join(filter(None, (stretch[0], str(stretch[1]))))
        decisions.append(RecomputeDecision(
            block.name, sum(saves[i].nbytes for i in block.own),
            sum(unsplit.layers[i].forward_flops for i in block.layers),
            (entry, 0) in offloaded))
    return decisions
