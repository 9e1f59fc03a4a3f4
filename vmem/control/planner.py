"""The planner: keep or offload each saved tensor, and the prefetch distance, under a budget.

Policies:

- ``none``: keep everything (the plan still predicts the peak, and checks the budget);
- ``vdnn_all``: offload every tracked saved activation (vDNN's "all");
- ``vdnn_conv``: offload only what convolutions save, their inputs (vDNN's "conv");
- ``auto``: offload as little as keeps the predicted peak within the budget, taking first the
  tensors whose transfers hide best behind compute: those saved in segments with the most
  FLOPs per byte, the last segment's (whose prefetch nothing can hide) last, and none whose
  offload frees nothing (the forward code still holds them).

``auto`` is a greedy prefix on that order: offloading more never raises the predicted curve
(:mod:`.memory`), so the shortest sufficient prefix is found by bisection, and a smaller
budget never offloads less nor predicts a higher peak. The prefetch distance is then the
largest (up to ``MAX_DISTANCE``) that still fits: prefetching earlier hides more of each copy
but holds more bytes; given the hardware, the one among those whose step the timeline
simulator (:mod:`.simulator`) finds fastest. When even the policy's most offloading plan
does not fit,
:class:`vmem.BudgetTooSmall` names the smallest budget that would and the layer at its peak.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..errors import BudgetTooSmall
from ..preprocessing.hardware import HardwareSpec
from ..preprocessing.optimizer import OptimizerProfile
from ..preprocessing.profile import NetworkProfile, SavedStorage
from ..transfer.compression import compressed_nbytes, pays
from .memory import MemoryModel
from .plan import KEEP, OFFLOAD, Plan, SaveDecision, SegmentPlan
from .segments import segment_of_layers
from .simulator import simulate

__all__ = ["make_plan", "headroom_for", "offload_everything", "MAX_DISTANCE", "MIN_BYTES"]

MAX_DISTANCE = 4  # segments
MIN_BYTES = 16 * 2**10  # smaller saves stay: not worth a transfer


def headroom_for(device_type: str) -> tuple[float, int]:
    """(fraction of the budget, bytes) kept free beyond the model's prediction.

    On CUDA: 5% and 256 MiB, for the caching allocator's rounding and cuDNN's workspaces,
    which the shape-only profile cannot see. On the emulated device the prediction counts
    what the meter counts, so 2% suffices.
    """
    return (0.05, 256 * 2**20) if device_type == "cuda" else (0.02, 0)


def offload_everything(budget: int | None, headroom: tuple[float, int],
                       start_bytes: int) -> Plan:
    """The plan for a step that could not be profiled: every tracked save offloaded, and
    fetched back only when backward needs it (no staging: nothing says how much room the
    rest of backward needs).

    Example::

        >>> offload_everything(2**30, (0.02, 0), 0).unplanned
        'offload'
    """
    fraction, fixed = headroom
    target = None if budget is None else int(budget * (1 - fraction)) - fixed
    return Plan(policy="vdnn_all", budget=budget, target=target,
                headroom=0 if budget is None else budget - target, prefetch_distance=1,
                min_bytes=MIN_BYTES, saves=[], segments=[], predicted_peak=start_bytes,
                plain_peak=start_bytes, staging_bytes=0, resident_bytes=0,
                start_bytes=start_bytes, unplanned=OFFLOAD)


def make_plan(profile: NetworkProfile, *, budget: int | None, policy: str,
              prefetch_distance: int | None = None, optimizer: OptimizerProfile | None = None,
              gradients_held: bool = False, headroom: tuple[float, int] = (0.02, 0),
              min_bytes: int = MIN_BYTES, spec: HardwareSpec | None = None,
              compress: bool = False, outside_bytes: int = 0, recomputed=(),
              sweep: bool = True) -> Plan:
    """Plan one training step of ``profile`` within ``budget`` bytes.

    ``gradients_held``: the parameters' gradients are on the device when forward starts
    (gradient accumulation, ``zero_grad(set_to_none=False)``); unless the profile's step
    held them too (``NetworkProfile.gradients_held``), they are added throughout, on top of
    those its backward creates. ``outside_bytes``: device bytes in
    use when forward starts that the profile does not see (a dataset on the device the loop
    slices, another model, what a session before this one left), added throughout and to
    the optimizer step. ``spec``: the hardware to simulate
    the step on (:mod:`.simulator`); with it ``auto`` takes the prefetch distance of the
    fastest simulated step, and the plan carries its predicted time. ``compress``: the
    transfer backend compresses, so an offload whose measured density (the profile's
    ``SavedStorage.density``) makes compression pay (:func:`~vmem.transfer.compression.pays`)
    crosses the link compressed, and ``auto`` ranks saves by FLOPs per byte on the link.
    Compression moves no device memory (:mod:`.memory`); the plan without it is made too and
    taken when the compressed one is simulated no faster (without ``spec``, the compressed
    plan is taken). ``recomputed``: blocks (:mod:`.blocks`) of ``profile`` to count as
    recomputed (what a plan would be with them, before profiling the model so; the plan
    returned does not install them). ``sweep``: with ``spec``, simulate every prefetch
    distance that fits (else only the widest).

    Example::

        >>> from vmem import models
        >>> from vmem.preprocessing import profile_network
        >>> prof = profile_network(models.resnet18(), (8, 3, 64, 64))
        >>> plan = make_plan(prof, budget=100 * 2**20, policy="auto")  # plain: 100.0 MiB
        >>> plan.predicted_peak <= plan.target < prof.peak_bytes
        True
    """
    keywords = dict(budget=budget, policy=policy, prefetch_distance=prefetch_distance,
                    optimizer=optimizer, gradients_held=gradients_held, headroom=headroom,
                    min_bytes=min_bytes, spec=spec, outside_bytes=outside_bytes,
                    recomputed=recomputed, sweep=sweep)
    raw = _make_plan(profile, compress=False, **keywords)  # raises when nothing fits
    if not compress or all(save.density is None for save in profile.timeline.saves):
        return raw
    packed = _make_plan(profile, compress=True, **keywords)  # same memory: fits as raw does
    if spec is None or packed.predicted_seconds < raw.predicted_seconds:
        return packed
    return raw


def _make_plan(profile: NetworkProfile, *, budget: int | None, policy: str,
               prefetch_distance: int | None, optimizer: OptimizerProfile | None,
               gradients_held: bool, headroom: tuple[float, int], min_bytes: int,
               spec: HardwareSpec | None, compress: bool, outside_bytes: int, recomputed,
               sweep: bool) -> Plan:
    """:func:`make_plan` with compression where it pays (``compress``) or nowhere."""
    layer_segment = segment_of_layers(profile.layers)
    state = optimizer.state_bytes if optimizer else 0
    grads = profile.param_bytes if gradients_held and not profile.gradients_held else 0
    held = state + grads + outside_bytes
    model = MemoryModel(profile, layer_segment, min_bytes, extra_bytes=held,
                        recomputed=recomputed)
    step_peak = 0
    if optimizer:  # the step also sees the buffers and the input batch
        step_peak = optimizer.step_peak + profile.buffer_bytes + profile.input_bytes + \
            outside_bytes
    fraction, fixed = headroom
    target = None if budget is None else int(budget * (1 - fraction)) - fixed

    def peak(offloaded: list[int], distance: int) -> int:
        return max(int(model.curve(offloaded, distance).max()), step_peak)

    def too_small(offloaded: list[int], distance: int) -> BudgetTooSmall:
        need = peak(offloaded, distance)
        curve = model.curve(offloaded, distance)
        op = int(curve.argmax())
        layer_index = profile.timeline.layer[op]
        layer = "optimizer.step" if step_peak >= int(curve.max()) else \
            profile.layers[layer_index].name if layer_index >= 0 else "the loss"
        return BudgetTooSmall(budget, math.ceil((need + fixed) / (1 - fraction)), layer)

    link = [_link_bytes(save, compress) for save in model.saves]
    order = _candidates(profile, model, policy, link)
    if policy == "auto":
        offloaded = [] if target is None else _shortest_prefix(order, target, peak)
        if offloaded is None:
            raise too_small(order, prefetch_distance or 1)
        distance = prefetch_distance or _widest_distance(offloaded, target, peak)
    else:
        offloaded, distance = order, prefetch_distance or 1
    if target is not None and peak(offloaded, distance) > target:
        raise too_small(offloaded, distance)
    plan = _assemble(profile, model, layer_segment, policy, budget, target, fraction, fixed,
                     offloaded, distance, min_bytes, held, peak, link)
    if spec is None:
        return plan
    if policy == "auto" and prefetch_distance is None and offloaded and sweep:
        plans = [plan] + [_assemble(profile, model, layer_segment, policy, budget, target,
                                    fraction, fixed, offloaded, d, min_bytes, held, peak,
                                    link)
                          for d in range(1, distance)]  # every distance that fits
        timed = [dataclasses.replace(p, predicted_seconds=simulate(
            profile, p, spec, recomputed).iteration_s) for p in plans]
        return min(timed, key=lambda p: (p.predicted_seconds, -p.prefetch_distance))
    return dataclasses.replace(plan, predicted_seconds=simulate(profile, plan, spec,
                                                                recomputed).iteration_s)


def _link_bytes(save: SavedStorage, compress: bool) -> int:
    """Bytes ``save`` puts on the host link when offloaded: compressed where that pays."""
    elem = save.elem_size
    if not compress or save.density is None or elem not in (1, 2, 4, 8) or save.nbytes % elem:
        return save.nbytes
    numel = save.nbytes // elem
    if not pays(numel, elem, save.density):
        return save.nbytes
    return compressed_nbytes(numel, elem, math.ceil(save.density * numel))


def _candidates(profile: NetworkProfile, model: MemoryModel, policy: str,
                link: list[int]) -> list[int]:
    """The saves a policy may offload, best first."""
    if policy == "none":
        return []
    everything = list(range(len(model.saves)))
    if policy == "vdnn_all":
        return everything
    if policy == "vdnn_conv":
        return [i for i in everything
                if any(profile.layers[k].conv for k in model.saves[i].layers)]
    flops = [0] * model.segments  # forward + backward FLOPs per segment
    for layer, segment in zip(profile.layers, model.layer_segment, strict=True):
        flops[segment] += layer.forward_flops + layer.backward_flops
    last = model.segments - 1
    useful = [i for i in everything
              if model.saves[i].released_at < model.prefetch_at(model.segment[i], 1)]
    return sorted(useful, key=lambda i: (model.segment[i] == last,
                                         -flops[model.segment[i]] / link[i], i))


def _shortest_prefix(order: list[int], target: int, peak) -> list[int] | None:
    """The shortest prefix of ``order`` whose peak (at distance 1) fits ``target``."""
    if peak(order, 1) > target:
        return None
    low, high = 0, len(order)  # peak(order[:high]) fits
    while low < high:
        middle = (low + high) // 2
        if peak(order[:middle], 1) <= target:
            high = middle
        else:
            low = middle + 1
    return order[:high]


def _widest_distance(offloaded: list[int], target: int | None, peak) -> int:
    if not offloaded:
        return 1
    distance = 1
    while distance < MAX_DISTANCE and (target is None or peak(offloaded, distance + 1) <= target):
        distance += 1
    return distance


def _assemble(profile, model, layer_segment, policy, budget, target, fraction, fixed,
              offloaded, distance, min_bytes, state, peak, link) -> Plan:
    chosen = set(offloaded)
    curve = model.curve(offloaded, distance)
    rise = _rise(curve, peak(offloaded, distance))
    saves = [SaveDecision(s.nbytes, profile.layers[s.layers[0]].name, model.segment[i],
                          OFFLOAD if i in chosen else KEEP,
                          *((link[i], s.elem_size) if i in chosen and link[i] < s.nbytes
                            else (0, 0)), key=s.key, rise=rise[s.saved_at])
             for i, s in enumerate(model.saves)]
    plain = model.memmax(model.curve([], distance))
    planned = model.memmax(curve)
    segments = []
    for index in range(model.segments):
        members = [k for k, seg in enumerate(layer_segment) if seg == index]
        segments.append(SegmentPlan(
            index=index, first_layer=profile.layers[members[0]].name, layers=len(members),
            memmax_plain=plain[index], memmax=planned[index],
            offloaded_bytes=sum(d.nbytes for d in saves
                                if d.segment == index and d.action == OFFLOAD)))
    headroom = 0 if budget is None else budget - target
    return Plan(policy=policy, budget=budget, target=target, headroom=headroom,
                prefetch_distance=distance, min_bytes=min_bytes, saves=saves,
                segments=segments, predicted_peak=peak(offloaded, distance),
                plain_peak=peak([], distance),
                staging_bytes=model.staging_bytes(offloaded, distance), resident_bytes=state,
                start_bytes=(profile.layers[0].live_bytes if profile.layers else 0) + state)


def _rise(curve, peak: int) -> list[int]:
    """Per operator: the predicted peak from there to the end of the step (the optimizer's
    step included, when ``peak`` is above the curve) minus the bytes in use as a save
    there is made. A save is made between two operators (inputs before the next runs,
    outputs after the last ran), before what the next one frees: so the bytes then are
    the larger of the two operators' peaks."""
    later = torch.flip(torch.cummax(torch.flip(curve, (0,)), 0).values, (0,))
    if peak > int(curve.max()):
        later = torch.clamp(later, min=peak)
    at_save = torch.maximum(curve, torch.cat([curve[:1], curve[:-1]]))
    return torch.clamp(later - at_save, min=0).tolist()
