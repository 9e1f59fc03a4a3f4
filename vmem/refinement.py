"""Refinement: re-plan once with the layer times the first real steps measured.

A session's first plan for an input signature rests on estimates (a shape-only profile:
each layer's FLOPs at the device's compute rate). :class:`Refinement` times the plan's
first steps (:class:`~vmem.preprocessing.timing.LayerTimer`; ``WARM_UP`` step, then
``refine_steps``), gives every candidate profile ``auto`` weighs measured times
(:func:`measured_profile`), and adopts the best plan on those times only if its predicted
step beats the plan in force, simulated on the same times, by more than ``IMPROVEMENT``.
The re-plan runs :func:`vmem.planning.plan_model` again with the same budget, so the new
plan keeps the same promise; the session installs it as it installs any plan. Sessions
refine by default on a GPU only: on the emulated device the layer times would be the CPU's
while the copies are emulated, so the comparison would mean little (``refine_steps`` turns
it on there, for tests).

The same steps sample each tracked save's density (its fraction of non-zero elements, on
the device, read only at the re-plan); every candidate profile's saves take the density
measured for the same layer and size, so that with a backend that compresses
(:mod:`vmem.transfer.compression`) the re-plan sends compressed the offloads where that pays.

Times move between candidates by name and by work: a layer with the same name and FLOPs as a
timed one takes its time; one whose work changed (a run recomputed or split another way,
or run plain where the plan in force ran it as one ``SplitRun``) takes its FLOPs at the
measured milliseconds per FLOP of the timed layers of the same run, forward and backward
together (recomputation moves forward work into backward); any other (a residual add,
which no hook times) its FLOPs at the measured rate of the whole network.

Example::

    >>> from vmem import models
    >>> from vmem.preprocessing import profile_network
    >>> prof = profile_network(models.vgg11(), (2, 3, 32, 32))
    >>> times = {layer.name: (1.0, 2.0) for layer in prof.layers if layer.module}
    >>> timed = measured_profile(prof, prof, times, {})
    >>> timed.layers[0].forward_ms, timed.layers[0].backward_ms
    (1.0, 2.0)
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import nn

from .control.simulator import simulate
from .feedforward.split_runs import Run, find_runs
from .planning import Planned
from .preprocessing.hardware import HardwareSpec
from .preprocessing.profile import LayerProfile, NetworkProfile
from .preprocessing.timing import LayerTimer

__all__ = ["Refinement", "Outcome", "measured_profile", "STEPS", "WARM_UP", "IMPROVEMENT"]

STEPS = 3  # measured steps before the re-plan, by default on a GPU (Config.refine_steps)
WARM_UP = 1  # steps timed but not counted: the allocator, cuDNN's autotuning, the pools
IMPROVEMENT = 0.05  # adopt the new plan only if its predicted step is faster by more


@dataclasses.dataclass(frozen=True)
class Outcome:
    before_s: float  # the plan in force, simulated on the measured times
    after_s: float  # the best plan on the measured times
    changed: bool  # whether that plan was adopted
    error: str | None = None  # why the re-plan failed (the plan in force stays), if it did


class Refinement:
    """One input signature's refinement: time its first steps, then decide once.

    ``planned``: the plan in force and its profile (whose layers are timed); ``steps``: how
    many steps to measure after the warm-up.
    """

    def __init__(self, model: nn.Module, planned: Planned, device: torch.device,
                 steps: int) -> None:
        self.planned, self.steps = planned, steps
        self.timer = LayerTimer(model, [layer.name for layer in planned.profile.layers
                                        if layer.module], device)
        self.groups = _groups(find_runs(model))
        self.samples: dict = {}  # the executor's density samples (OffloadExecutor)
        self.sampled = 0  # forwards sampled: at most WARM_UP + steps, backward or not
        self.outcome: Outcome | None = None
        self.timed_profile: NetworkProfile | None = None  # the plan in force's, retimed

    def sampling(self) -> dict | None:
        """The dict the executor samples densities into this forward; None once enough
        forwards were sampled (forwards without a backward count too)."""
        if self.sampled >= WARM_UP + self.steps:
            return None
        self.sampled += 1
        return self.samples

    @property
    def measured(self) -> int:
        """Steps measured so far, warm-up excluded."""
        return max(0, len(self.timer.finished()) - WARM_UP)

    @property
    def ready(self) -> bool:
        return self.outcome is None and self.measured >= self.steps

    def retime(self):
        """The function that gives a candidate profile the measured times."""
        return functools.partial(measured_profile, reference=self.planned.profile,
                                 times=self.timer.median(skip=WARM_UP), groups=self.groups,
                                 densities=self.densities())

    def densities(self) -> dict[tuple[str, int], float]:
        """``{(layer, bytes): fraction of non-zero elements}`` over the sampled saves."""
        # The sampled steps are over: reading the counts waits for nothing long.
        return {key: int(count) / elements for key, (count, elements) in self.samples.items()
                if elements}

    def give_up(self, error: Exception) -> None:
        """The re-plan failed: keep the plan in force, and say why in the report."""
        self.samples.clear()
        self.outcome = Outcome(float("nan"), float("nan"), False, f"{type(error).__name__}: "
                               f"{str(error).strip().splitlines()[0]}")

    def decide(self, best: Planned, spec: HardwareSpec, retime) -> bool:
        """Whether ``best`` (planned on ``retime``'s times) replaces the plan in force."""
        self.timed_profile = retime(self.planned.profile)
        before = simulate(self.timed_profile, self.planned.plan, spec).iteration_s
        after = best.plan.predicted_seconds
        changed = after is not None and after < before * (1 - IMPROVEMENT)
        self.outcome = Outcome(before, before if after is None else after, changed)
        self.samples.clear()  # the counts' device memory
        return changed

    def to_dict(self) -> dict:
        data = {"steps": self.steps, "measured": self.measured, "ran": self.outcome is not None}
        if self.outcome is not None:
            data.update(predicted_seconds_before=self.outcome.before_s,
                        predicted_seconds_after=self.outcome.after_s,
                        changed=self.outcome.changed, error=self.outcome.error)
        return data

    def summary(self) -> str:
        if self.outcome is None:
            return (f"refinement: measuring, {self.measured} of {self.steps} step(s) "
                    f"after {WARM_UP} warm-up")
        if self.outcome.error is not None:
            return f"refinement: the re-plan failed, kept the plan ({self.outcome.error})"
        before, after = self.outcome.before_s * 1e3, self.outcome.after_s * 1e3
        verdict = "re-planned" if self.outcome.changed else \
            f"kept the plan (not more than {IMPROVEMENT:.0%} faster)"
        return (f"refinement: on {self.steps} measured step(s), predicted step "
                f"{before:.2f} ms in force, {after:.2f} ms best; {verdict}")


def measured_profile(profile: NetworkProfile, reference: NetworkProfile,
                     times: dict[str, tuple[float, float]], groups: dict[str, Run],
                     densities: dict[tuple[str, int], float] | None = None) -> NetworkProfile:
    """``profile`` with every layer's forward and backward ms from ``times``, which were
    measured on the layers of ``reference``; ``groups`` maps layer names to their run;
    ``densities`` gives saves their measured density by (first layer's name, bytes).
    The rules are the module docstring's."""
    timed = {layer.name: layer for layer in reference.layers if layer.name in times}
    by_run: dict[Run, list[LayerProfile]] = {}
    for layer in timed.values():
        if (run := groups.get(_module_of(layer.name))) is not None:
            by_run.setdefault(run, []).append(layer)
    overall = _ms_per_flop(list(timed.values()), times) or 0.0
    rate = {run: _ms_per_flop(layers, times) for run, layers in by_run.items()}
    layers = []
    for layer in profile.layers:
        same = timed.get(layer.name)
        if same is not None and _work(same) == _work(layer):
            forward_ms, backward_ms = times[layer.name]
        else:
            ms = rate.get(groups.get(_module_of(layer.name))) or overall
            forward_ms, backward_ms = layer.forward_flops * ms, layer.backward_flops * ms
        layers.append(dataclasses.replace(layer, forward_ms=forward_ms,
                                          backward_ms=backward_ms))
    saves = [dataclasses.replace(save, density=(densities or {}).get(
                 (profile.layers[save.layers[0]].name, save.nbytes)) if save.layers else None)
             for save in profile.timeline.saves]
    return dataclasses.replace(profile, layers=layers,
                               timeline=dataclasses.replace(profile.timeline, saves=saves))


def _groups(runs: list[Run]) -> dict[str, Run]:
    """Each run's layers' names, split (one ``SplitRun``) and plain, to the run."""
    return {name: run for run in runs for name in [run.module_name, *run.layer_names()]}


def _module_of(name: str) -> str:
    return name.split("#")[0]


def _work(layer: LayerProfile) -> tuple[int, int]:
    return layer.forward_flops, layer.backward_flops


def _ms_per_flop(layers: list[LayerProfile], times: dict) -> float | None:
    flops = sum(layer.forward_flops + layer.backward_flops for layer in layers)
    return sum(sum(times[layer.name]) for layer in layers) / flops if flops else None
