"""The plan: what the feed-forward module does with each saved tensor, and what it predicts."""

from __future__ import annotations

import dataclasses
import json

from ..errors import format_bytes
from ..preprocessing.keys import SaveKey
from ..transfer.compression import compressed_nbytes

__all__ = ["Plan", "RecomputeDecision", "SaveDecision", "SegmentPlan", "SplitDecision", "KEEP",
           "OFFLOAD"]

KEEP, OFFLOAD = "keep", "offload"


@dataclasses.dataclass(frozen=True)
class SaveDecision:
    """One tracked saved storage, in the order the forward first saves it."""

    nbytes: int
    layer: str  # the layer that saved it first
    segment: int  # the segment whose backward needs it first
    action: str  # KEEP or OFFLOAD
    compressed_bytes: int = 0  # offloaded compressed: the predicted bytes on the link; 0: raw
    elem_size: int = 0  # bytes per element, where compressed (the format's unit)
    key: SaveKey | None = None  # how the executor finds it (see [Note: Which save is it])
    rise: int = 0  # predicted peak from its save on, minus the device bytes at its save:
    # the safety net offloads it anyway when the bytes in use plus this pass the target

    def __post_init__(self) -> None:
        if self.key is not None and not isinstance(self.key, SaveKey):
            object.__setattr__(self, "key", SaveKey.of(self.key))

    @property
    def compress(self) -> bool:
        return self.compressed_bytes > 0

    @property
    def link_bytes(self) -> int:
        """Bytes that cross the host link each way when offloaded."""
        return self.compressed_bytes or self.nbytes


@dataclasses.dataclass(frozen=True)
class SegmentPlan:
    index: int
    first_layer: str  # the segment's convolution (or the network's first layer)
    layers: int
    memmax_plain: int  # peak device bytes while its forward or backward runs, nothing offloaded
    memmax: int  # the same under this plan
    offloaded_bytes: int


@dataclasses.dataclass(frozen=True)
class SplitDecision:
    """A run of layers executed in parts (mmCNN's Self Part Number)."""

    run: str  # e.g. "features[0:7]": children 0 to 6 of the Sequential ``features``
    parts: int  # 0: not split, its cheap layers recomputed in backward
    axis: int  # 0: batch, 2: height, 3: width
    memmax_before: int  # peak device bytes while the run's layers work, unsplit, plain
    memmax_after: int  # the same, split
    streamed_bytes: int = 0  # its input, kept in the host pool for backward (not on device)


@dataclasses.dataclass(frozen=True)
class RecomputeDecision:
    """A block run again in backward instead of keeping its saves (:mod:`.blocks`)."""

    block: str  # "layer1.0" (a module), or "features[0:3]" (a stretch of a Sequential)
    freed_bytes: int  # its own saves, which it no longer keeps
    forward_flops: int  # what running it again costs
    input_offloaded: bool = False  # its input (what it is recomputed from) goes to the host


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to offload and how far ahead to prefetch, with the predicted peak.

    Example::

        >>> plan = Plan("none", None, None, 0, 1, 2**14, [], [], 100, 100, 0, 0)
        >>> Plan.from_json(plan.to_json()) == plan
        True
    """

    policy: str  # the policy that made it: auto, none, vdnn_all, vdnn_conv
    budget: int | None  # bytes; None: no budget
    target: int | None  # budget minus headroom: the predicted peak stays at or below it
    headroom: int  # bytes kept free for what the model cannot see (allocator, workspaces)
    prefetch_distance: int  # segments ahead of backward (mmCNN's Convolutional Part Number)
    min_bytes: int  # saves smaller than this always stay on the device
    saves: list[SaveDecision]
    segments: list[SegmentPlan]
    predicted_peak: int  # bytes, the whole step (forward, backward, optimizer step)
    plain_peak: int  # the same with nothing offloaded
    staging_bytes: int  # most bytes fetched back and not yet freed (the staging pool)
    resident_bytes: int  # added to the profile's curve: optimizer state, gradients if held,
    # what else is on the device when the step starts (a dataset, another model)
    splits: list[SplitDecision] = dataclasses.field(default_factory=list)
    approximate: bool = False  # splits are Split-CNN's, which change the function
    predicted_seconds: float | None = None  # one step on the timeline simulator, if run
    start_bytes: int = 0  # device bytes in use as the step's first forward starts, assumed
    unplanned: str = KEEP  # what to do with a save the plan does not know (safety net aside)
    forwards: int = 1  # forwards of the model in one step (before its backward)
    recomputed: list[RecomputeDecision] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        object.__setattr__(self, "saves", [s if isinstance(s, SaveDecision)
                                           else SaveDecision(**s) for s in self.saves])
        object.__setattr__(self, "segments", [s if isinstance(s, SegmentPlan)
                                              else SegmentPlan(**s) for s in self.segments])
        object.__setattr__(self, "splits", [s if isinstance(s, SplitDecision)
                                            else SplitDecision(**s) for s in self.splits])
        object.__setattr__(self, "recomputed", [
            r if isinstance(r, RecomputeDecision) else RecomputeDecision(**r)
            for r in self.recomputed])

    @property
    def offloaded_bytes(self) -> int:
        return sum(s.nbytes for s in self.saves if s.action == OFFLOAD)

    @property
    def streamed_bytes(self) -> int:
        """Bytes of split runs' inputs that stream through the host pool each step."""
        return sum(s.streamed_bytes for s in self.splits)

    @property
    def offloaded(self) -> int:
        return sum(1 for s in self.saves if s.action == OFFLOAD)

    @property
    def link_bytes(self) -> int:
        """Bytes the offloads put on the host link each way per step (after compression)."""
        return sum(s.link_bytes for s in self.saves if s.action == OFFLOAD)

    @property
    def host_bytes(self) -> int:
        """Host pool bytes one step needs: a compressed save's slot holds its worst case."""
        return self.streamed_bytes + sum(
            compressed_nbytes(s.nbytes // s.elem_size, s.elem_size, s.nbytes // s.elem_size)
            if s.compress else s.nbytes for s in self.saves if s.action == OFFLOAD)

    def to_json(self, **kwargs) -> str:
        return json.dumps(dataclasses.asdict(self), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls(**json.loads(text))

    def table(self) -> str:
        """Per segment Memmax before and after, and the totals, for people."""
        head = (f"{'seg':>4}  {'first layer':<26} {'layers':>6} {'Memmax plain':>13} "
                f"{'Memmax':>11} {'offloaded':>11}")
        rows = [head, "-" * len(head)]
        for seg in self.segments:
            rows.append(f"{seg.index:>4}  {seg.first_layer[-26:]:<26} {seg.layers:>6} "
                        f"{format_bytes(seg.memmax_plain):>13} {format_bytes(seg.memmax):>11} "
                        f"{format_bytes(seg.offloaded_bytes):>11}")
        if self.splits:
            kind = "approximate (Split-CNN, changes the function)" if self.approximate else \
                "exact"
            rows += ["", f"runs split or recomputed, {kind}:",
                     f"{'run':<24} {'parts':>5} {'axis':>9} {'Memmax unsplit':>15} "
                     f"{'split':>11} {'streamed':>11}"]
            for split in self.splits:
                axis = "cheap" if split.parts == 0 else \
                    {0: "batch", 2: "height", 3: "width"}[split.axis]
                rows.append(f"{split.run[-24:]:<24} {split.parts:>5} {axis:>9} "
                            f"{format_bytes(split.memmax_before):>15} "
                            f"{format_bytes(split.memmax_after):>11} "
                            f"{format_bytes(split.streamed_bytes):>11}")
        if self.recomputed:
            rows += ["", f"blocks recomputed in backward ({len(self.recomputed)}):",
                     f"{'block':<28} {'frees':>11} {'recompute GF':>13} {'its input':>10}"]
            for block in self.recomputed:
                rows.append(f"{block.block[-28:]:<28} {format_bytes(block.freed_bytes):>11} "
                            f"{block.forward_flops / 1e9:>13.2f} "
                            f"{'offloaded' if block.input_offloaded else 'kept':>10}")
        budget = "none" if self.budget is None else \
            f"{format_bytes(self.budget)} (target {format_bytes(self.target)}, headroom " \
            f"{format_bytes(self.headroom)})"
        rows += [
            "",
            f"policy {self.policy}, budget {budget}, prefetch distance "
            f"{self.prefetch_distance} segment(s)",
            f"offloaded {self.offloaded} of {len(self.saves)} saved tensors: "
            f"{format_bytes(self.offloaded_bytes)} per step"
            + (f", {sum(s.compress for s in self.saves)} compressed: "
               f"{format_bytes(self.link_bytes)} on the link" if self.link_bytes <
               self.offloaded_bytes else ""),
            f"predicted peak {format_bytes(self.predicted_peak)} ({self.predicted_peak} bytes) "
            f"against plain {format_bytes(self.plain_peak)}; staging "
            f"{format_bytes(self.staging_bytes)}",
        ]
        if self.predicted_seconds is not None:
            rows.append(f"predicted step time {self.predicted_seconds * 1e3:.1f} ms "
                        "(timeline simulator)")
        return "\n".join(rows)
