"""The memory model: device bytes over one training step for a choice of offloads.

The profile's timeline gives the plain step's memory during each operator and, for each
saved storage, when the forward code lets go of it (``released_at``), when backward first
needs it (``needed_at``) and when plain training frees it. Offloading a storage removes its
bytes from the moment it is released until its prefetch is issued; nothing else changes, so
offloading more never raises the curve (the planner relies on that). A compressed offload
changes nothing here: its bytes leave and come back whole (the kernels read and write the host
slot directly; their workspace is the chunk counts and, in forward, a mask of a thirty-second
of an fp32 save, which the headroom covers).

A recomputed block (:mod:`.blocks`) frees its own saves the same way, from their release
until the first operator that unpacks one of them, where the block runs again
(:meth:`MemoryModel.recompute_at`); they are then no offload candidates, and the block's
inputs are needed from that operator on (the recomputation unpacks them first).

The prefetch of a storage is issued by the first unpack, in backward, of any tracked save of a
segment no more than ``distance`` segments after the storage's own, which is the rule the
executor (:mod:`vmem.feedforward.offload`) follows.
"""

from __future__ import annotations

import dataclasses

import torch

from ..preprocessing.profile import NetworkProfile

__all__ = ["MemoryModel"]


class MemoryModel:
    """Predicts the memory curve of a plan; built once per profile, evaluated many times."""

    def __init__(self, profile: NetworkProfile, layer_segment: list[int], min_bytes: int,
                 extra_bytes: int = 0, recomputed=()) -> None:
        timeline = profile.timeline
        self.layer_segment = layer_segment
        self.steps = len(timeline.memory)
        self.backward_from = timeline.backward_from
        # Plain memory per operator, with what the profile does not see (optimizer state).
        self.base = torch.tensor(timeline.memory, dtype=torch.int64) + extra_bytes
        self.recomputed = list(recomputed)
        gone, needed = set(), {}  # own saves of recomputed blocks; inputs needed earlier
        for block in self.recomputed:
            self.base += self.freed(profile, block)
            gone.update(block.own)
            at = self.recompute_at(profile, block)
            for i in block.inputs:  # the recomputation unpacks its inputs first
                needed[i] = min(needed.get(i, at), at)
        self.op_segment = torch.tensor([layer_segment[i] if i >= 0 else -1
                                        for i in timeline.layer], dtype=torch.int64)
        # The tracked saves: storages of at least min_bytes, in the order of first save.
        self.saves = [dataclasses.replace(s, needed_at=min(s.needed_at, needed[i]))
                      if i in needed else s for i, s in enumerate(timeline.saves)
                      if s.nbytes >= min_bytes and s.layers and i not in gone]
        self.segment = [layer_segment[max(s.layers)] for s in self.saves]  # needed first
        self.segments = max(layer_segment, default=0) + 1
        first_unpack = [self.steps] * self.segments
        for save, segment in zip(self.saves, self.segment, strict=True):
            first_unpack[segment] = min(first_unpack[segment], save.needed_at)
        self.first_unpack = first_unpack

    def recompute_at(self, profile: NetworkProfile, block) -> int:
        """The operator at which backward recomputes ``block``: the first unpack of any
        save its layers made (the checkpoint holds them all)."""
        layers = block.layers
        return min(min((s.needed_at for s in profile.timeline.saves
                        if layers.intersection(s.layers)), default=self.steps), self.steps)

    def freed(self, profile: NetworkProfile, block) -> torch.Tensor:
        """The change to the curve (per operator) of recomputing ``block``: its own saves
        gone from their release until the recomputation; the saves it shares with later
        layers (its output, which the next layer keeps too) made again there, held twice
        until its backward is over."""
        saves = profile.timeline.saves
        delta = torch.zeros(self.steps + 1, dtype=torch.int64)
        start = self.recompute_at(profile, block)
        end = min(max((saves[i].freed_at for i in block.own), default=start), self.steps)
        for i in block.own:
            save = saves[i]
            if save.released_at < start:
                delta[save.released_at] -= save.nbytes
                delta[start] += save.nbytes
        layers, own = block.layers, set(block.own) | set(block.inputs)
        for i, save in enumerate(saves):
            if i not in own and layers.intersection(save.layers) and start < end:
                delta[start] += save.nbytes
                delta[end] -= save.nbytes
        return torch.cumsum(delta, 0)[: self.steps]

    def prefetch_at(self, segment: int, distance: int) -> int:
        """Operator index by which a storage needed in ``segment`` has been fetched back."""
        return min(self.first_unpack[: min(segment + distance, self.segments - 1) + 1])

    def curve(self, offloaded: list[int], distance: int) -> torch.Tensor:
        """Device bytes during each operator when the saves ``offloaded`` leave the device."""
        delta = torch.zeros(self.steps + 1, dtype=torch.int64)
        for index in offloaded:
            save = self.saves[index]
            start = save.released_at  # never, if the forward code holds on to it
            end = min(self.prefetch_at(self.segment[index], distance), save.needed_at)
            if start < end:
                delta[start] -= save.nbytes
                delta[end] += save.nbytes
        return self.base + torch.cumsum(delta, 0)[: self.steps]

    def staging_bytes(self, offloaded: list[int], distance: int) -> int:
        """Most bytes ever fetched back and not yet freed: the staging pool's size."""
        delta = torch.zeros(self.steps + 1, dtype=torch.int64)
        for index in offloaded:
            save = self.saves[index]
            start = min(self.prefetch_at(self.segment[index], distance), save.needed_at)
            delta[start] += save.nbytes
            delta[min(save.freed_at, self.steps)] -= save.nbytes
        return int(torch.cumsum(delta, 0).max()) if offloaded else 0

    def memmax(self, curve: torch.Tensor) -> list[int]:
        """Peak bytes per segment, over its forward and its backward operators."""
        peaks = []
        for segment in range(self.segments):
            mask = self.op_segment == segment
            peaks.append(int(curve[mask].max()) if bool(mask.any()) else 0)
        return peaks
