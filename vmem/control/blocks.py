"""Blocks: the units of a profiled model that can be recomputed, and what recomputing each
would free.

A block is any submodule the profile saw called (a residual block, a dense layer, an
MBConv, a UNet stage, a custom leaf module doing several operations), or a stretch of
leaf children of a plain ``nn.Sequential`` that ran as one (from a convolution up to the
next, or across up to ``STRETCH_ATOMS`` convolutions: a VGG conv group), 2D or 3D
alike, named as :mod:`vmem.feedforward.blocks` installs them. Recomputing a block frees
its *own* saves (those only its layers make,
not its inputs) from the moment the forward code lets go of them until backward first
unpacks one of them, where the whole block runs again: the same interval arithmetic as an
offload fetched on demand (:mod:`.memory`), with the block's forward time in place of the
copy. A block inside the model's own checkpoint, or inside one of vmem's split runs, is
never a candidate.

Example::

    >>> from vmem import models
    >>> from vmem.preprocessing import profile_network
    >>> prof = profile_network(models.resnet20(), (8, 3, 32, 32))
    >>> [b.name for b in find_blocks(prof)][:4]
    ['layer1', 'layer1.0', 'layer1.1', 'layer1.2']
"""

from __future__ import annotations

import dataclasses

import torch

from ..preprocessing.profile import NetworkProfile
from .memory import MemoryModel
from .segments import segment_of_layers
from .simulator import block_seconds

__all__ = ["Block", "find_blocks", "recompute_order", "STRETCH_ATOMS"]

STRETCH_ATOMS = 4  # convolutions a stretch of an nn.Sequential's children spans, at most
MIN_OWN_BYTES = 16 * 2**10  # a block freeing less (a BatchNorm's batch statistics) is none


@dataclasses.dataclass(frozen=True)
class Block:
    name: str  # as the plan names it: "layer1.0", or "features[0:3]" for a stretch
    spans: tuple[tuple[int, int], ...]  # [start, stop) layer ranges, one per call
    own: tuple[int, ...]  # indices into the profile's timeline.saves it frees
    inputs: tuple[int, ...]  # the saves its calls receive: kept (or offloaded) instead

    @property
    def path(self) -> str:
        """The module path, for nesting: a stretch ``c[a:b]`` sits in ``c``."""
        return _path(self.name)

    @property
    def layers(self) -> set[int]:
        """The indices of its layers, over all its calls."""
        return {i for start, stop in self.spans for i in range(start, stop)}

    def contains(self, other: Block) -> bool:
        return any(s <= o_start and o_stop <= e for s, e in self.spans
                   for o_start, o_stop in other.spans)

    def overlaps(self, other: Block) -> bool:
        return any(s < o_stop and o_start < e for s, e in self.spans
                   for o_start, o_stop in other.spans)


def find_blocks(profile: NetworkProfile, *, model_chain: bool = False,
                exclude: tuple[str, ...] = ()) -> list[Block]:
    """Every block of ``profile`` whose recomputation frees at least ``MIN_OWN_BYTES`` and a
    thousandth of what the step saves, in call order.

    ``model_chain``: the model itself is a plain ``nn.Sequential`` (its children's
    stretches are blocks too); ``exclude``: modules never to recompute in (the profile's
    ``foreign`` ones: the model's own checkpoints, by default).
    """
    exclude = tuple(exclude) + tuple(profile.foreign)
    layers = profile.layers
    saves = profile.timeline.saves
    least = max(MIN_OWN_BYTES, sum(s.nbytes for s in saves) // 1000)  # below: not worth it
    spans: dict[str, list[tuple[int, int]]] = {}
    inputs: dict[str, set[int]] = {}
    for call in profile.calls:
        if call.inplace:
            continue  # it overwrites the input it would be recomputed from
        spans.setdefault(call.name, []).append((call.start, call.stop))
        inputs.setdefault(call.name, set()).update(call.inputs)
    for container, stretches in _stretches(profile, model_chain).items():
        for start, stop, first in stretches:
            name = f"{container}[{start}:{stop}]"
            first_call = next(c for c in profile.calls if c.name == first)
            if first_call.inplace:
                continue
            spans[name] = [(first_call.start, _stop_of(profile, container, stop - 1))]
            inputs[name] = set(first_call.inputs)
    blocks = []
    for name, ranges in spans.items():
        if any(_inside(name, other) for other in exclude if other) or "vmem_split" in name:
            continue
        covered = {i for start, stop in ranges for i in range(start, stop)}
        if not covered:
            continue
        own = tuple(i for i, s in enumerate(saves)
                    if s.layers and set(s.layers) <= covered and i not in inputs[name]
                    and not any(layers[k].name.split("#")[0] in exclude for k in s.layers))
        if sum(saves[i].nbytes for i in own) >= least:
            blocks.append(Block(name, tuple(ranges), own, tuple(sorted(inputs[name]))))
    return sorted(blocks, key=lambda b: (b.spans[0][0], -b.spans[0][1]))


def _path(name: str) -> str:
    return name.split("[", 1)[0]


def _inside(name: str, module: str) -> bool:
    """Whether block ``name`` is ``module`` or inside it."""
    path = _path(name)
    return path == module or path.startswith(module + ".")


def _stop_of(profile: NetworkProfile, container: str, index: int) -> int:
    child = f"{container}.{index}" if container else str(index)
    return next(c.stop for c in profile.calls if c.name == child)


def _stretches(profile: NetworkProfile, model_chain: bool) -> dict[str, list]:
    """Per plain ``nn.Sequential`` that ran as one: ``(start, stop, first child's name)``
    of each stretch of its leaf children from a convolution to the next (or the end)."""
    chains = {c.name for c in profile.calls if c.chain}
    if model_chain:
        chains.add("")
    by_name = {c.name: c for c in profile.calls if c.call == 0}
    found = {}
    for container in chains:
        prefix = f"{container}." if container else ""
        children, index = [], 0
        while f"{prefix}{index}" in by_name:
            children.append(by_name[f"{prefix}{index}"])
            index += 1
        atoms, start = [], None  # from a convolution up to the next (leaf children only)
        for i, child in enumerate([*children, None]):
            leaf = child is not None and child.stop - child.start == 1 and \
                profile.layers[child.start].module
            conv = leaf and profile.layers[child.start].conv
            if start is not None and (not leaf or conv):
                atoms.append((start, i))
                start = None
            if conv:
                start = i
        # Consecutive atoms, up to STRETCH_ATOMS of them: a stretch frees what its inner
        # convolutions read too, not only its BatchNorms' inputs.
        stretches = []
        for i in range(len(atoms)):
            for j in range(i, min(i + STRETCH_ATOMS, len(atoms))):
                if j > i and atoms[j][0] != atoms[j - 1][1]:
                    break  # a non-leaf child between: not one stretch
                if atoms[j][1] - atoms[i][0] > 1:
                    stretches.append((atoms[i][0], atoms[j][1], children[atoms[i][0]].name))
        if stretches:
            found[container] = stretches
    return found


def recompute_order(profile: NetworkProfile, blocks: list[Block],
                    seconds: list[float]) -> list[list[Block]]:
    """Sets of blocks to recompute, each from the one before by one greedy move: the block
    that lowers the predicted peak of the step the most per second of recomputation
    (``seconds``: each operator's, :func:`~.simulator.op_seconds`), taken in place of the
    chosen blocks inside it (a stage may replace its residual blocks), until no block
    lowers the peak. The last set is the lowest peak recomputation alone reaches this
    way; every set is a plan candidate. Each move is a vector sum per block, so a
    ResNet-152's few hundred blocks take a fraction of a second."""
    model = MemoryModel(profile, segment_of_layers(profile.layers), 0)
    freed = [model.freed(profile, block) for block in blocks]
    cost = [max(block_seconds(profile, block, seconds), 1e-12) for block in blocks]
    curve, chosen, sets = model.base.clone(), [], []
    while True:
        peak, best, best_gain, best_cost, replaced = int(curve.max()), None, 0.0, 0.0, []
        for i, block in enumerate(blocks):
            if i in chosen:
                continue
            inside = [c for c in chosen if block.contains(blocks[c])]
            if any(block.overlaps(blocks[c]) for c in chosen if c not in inside):
                continue  # inside a chosen block, or across one
            change = freed[i] - sum((freed[c] for c in inside), torch.zeros_like(curve))
            extra = cost[i] - sum(cost[c] for c in inside)
            gain = (peak - int((curve + change).max())) / max(extra, 1e-12)
            # Within 1% the smaller block: finer blocks recompute less at once later.
            if gain > best_gain * 1.01 or (gain > 0 and gain >= best_gain * 0.99 and
                                            extra < best_cost):
                best, best_gain, best_cost, replaced = i, gain, extra, inside
        if best is None:
            return sets
        for c in replaced:
            curve -= freed[c]
            chosen.remove(c)
        curve += freed[best]
        chosen.append(best)
        sets.append([blocks[c] for c in sorted(chosen)])
