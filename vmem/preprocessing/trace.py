"""The trace of a real step: what it did on the device, against what its plan predicted.

The shape-only profile cannot see everything a real step holds: the loss and its saved
tensors, labels, tensors the loop keeps, a hook's extra tensors. So the session traces the
first step run under each plan it installs (:class:`StepTrace`): the device bytes in use as
the step starts, its measured peak (forward, backward and the optimizer's step, up to the
next step's first forward), its forwards, and every tracked save by key (bytes, dtype, what
the executor did with it, whether the plan knew it and whether the safety net moved it),
and at each save the plan knew, the bytes in use plus the rise the plan predicts from there:
the peak the step was heading for, which the safety net may then have averted. From it the
session corrects the plan: a step whose saves the plan did not know is planned again from a
new profile; one that held more than predicted (:meth:`StepTrace.excess`) is planned again
with that excess as bytes in use throughout the step, by the same planner and simulator.

Example::

    >>> trace = StepTrace(start_bytes=100, predicted_peak=1000)
    >>> trace.reach(1200)  # at a save: 700 in use, 500 more predicted from there
    >>> trace.finish(peak=950, forwards=1)  # the safety net offloaded
    >>> trace.excess(assumed_start=100, next_start=100)
    200
    >>> trace.excess(assumed_start=150, next_start=150)  # 50 the plan counted came later
    250
"""

from __future__ import annotations

import dataclasses

from .keys import SaveKey

__all__ = ["StepTrace", "TracedSave"]


@dataclasses.dataclass(frozen=True)
class TracedSave:
    """One tracked save of a traced step, where it was first saved."""

    key: SaveKey | None  # None: saved outside every module the scope names
    nbytes: int
    dtype: str
    action: str  # what the executor did: "keep" or "offload"
    planned: bool  # the plan had a decision for its key
    forced: bool  # the safety net offloaded it against the plan


@dataclasses.dataclass
class StepTrace:
    """One real step, as the session and its executor saw it (see the module docstring)."""

    start_bytes: int  # device bytes in use as its first forward started
    predicted_peak: int  # its plan's
    saves: list[TracedSave] = dataclasses.field(default_factory=list)
    heading: int = 0  # most bytes in use at a known save plus the plan's rise from it
    peak: int | None = None  # measured, once the step is over
    forwards: int = 0

    def record(self, save: TracedSave) -> None:
        self.saves.append(save)

    def reach(self, nbytes: int) -> None:
        """At a save the plan knew: the bytes in use plus the plan's rise from it."""
        self.heading = max(self.heading, nbytes)

    def finish(self, peak: int, forwards: int) -> None:
        self.peak, self.forwards = peak, forwards

    @property
    def forced(self) -> int:
        """Saves the safety net offloaded that the plan would have kept."""
        return sum(1 for s in self.saves if s.forced)

    @property
    def unplanned(self) -> int:
        return sum(1 for s in self.saves if not s.planned)

    def excess(self, assumed_start: int, next_start: int) -> int:
        """Bytes beyond the predicted peak the step held (its measured peak) or was heading
        for (see :meth:`reach`), as if it had started with the ``assumed_start`` bytes its
        plan counted (the optimizer's state before its first step creates it), less what
        the next step of the same inputs starts with beyond that (``next_start``): a
        re-plan counts those as in use already."""
        missing = max(0, assumed_start - self.start_bytes)
        grown = max(0, next_start - max(assumed_start, self.start_bytes))
        return max(0, max(self.peak, self.heading) + missing - self.predicted_peak - grown)

    def to_dict(self) -> dict:
        return {"start_bytes": self.start_bytes, "predicted_peak": self.predicted_peak,
                "measured_peak": self.peak, "forwards": self.forwards,
                "saves": len(self.saves), "unplanned_saves": self.unplanned,
                "forced_offloads": self.forced, "heading_bytes": self.heading}
