"""The timeline simulator: a plan's training step on three streams, predicted.

The compute stream runs the profile's operators in order, each for its time plus a launch
overhead: measured on a GPU (each layer's forward and backward time spread evenly over its
operators), else a roofline: the larger of its FLOPs at the rate it computes at (TF32 for
an fp32 convolution, bf16/fp16 for a half-precision matrix operator, fp32 otherwise) and
the bytes it reads and writes at the device-memory bandwidth, where the spec knows it. A
recomputed block the plan is only considered for (``recomputed``: planned on the profile
of the model without it) adds its forward's time at the operator that recomputes it.
An offloaded save is copied out on the
device-to-host stream once its layer has produced it, and its device bytes go when both the
forward code has let go of it and the copy is done (what ``record_stream`` enforces); when
that would take the device past the plan's target, compute waits for copies out to finish,
as the caching allocator makes it when no block is free. Its
prefetch is issued on the host-to-device stream at the operator the executor issues it at
(:meth:`MemoryModel.prefetch_at`), after its copy out; the backward operator that first
needs it waits for it: that wait is the stall offloading costs. A copy runs at the link's
bandwidth, times ``duplex`` while the other direction is busy.

Outputs the iteration time, each stream's busy time, the stall, the device-memory curve over
time and its peak, and a Chrome/Perfetto trace (``chrome://tracing``, ui.perfetto.dev).

Example::

    >>> from vmem import models
    >>> from vmem.control import make_plan
    >>> from vmem.preprocessing import profile_network
    >>> from vmem.preprocessing.hardware import emulated_spec
    >>> prof = profile_network(models.resnet18(), (32, 3, 64, 64))
    >>> plan = make_plan(prof, budget=None, policy="vdnn_all")
    >>> sim = simulate(prof, plan, emulated_spec())
    >>> sim.iteration_s > sim.compute_s > 0 and sim.d2h_s > 0
    True
"""

from __future__ import annotations

import dataclasses
import heapq
import json

from ..preprocessing.hardware import HardwareSpec
from ..preprocessing.profile import NetworkProfile
from .memory import MemoryModel
from .plan import OFFLOAD, Plan
from .segments import segment_of_layers

__all__ = ["Simulation", "simulate", "op_seconds", "block_seconds", "DUPLEX", "LAUNCH_S"]

DUPLEX = 0.8  # each direction's share of its bandwidth while both directions copy
LAUNCH_S = 5e-6  # per operator: kernel launch and framework overhead


@dataclasses.dataclass
class Simulation:
    iteration_s: float  # forward + backward, from the first operator to the last
    compute_s: float  # the compute stream's busy time
    d2h_s: float  # the copy streams' busy times
    h2d_s: float
    stall_s: float  # compute waiting: for prefetches, or for copies out to free memory
    peak_bytes: int  # of the memory curve over time
    times: list[float]  # start of each operator
    memory: list[int]  # device bytes during each operator, over time
    events: list[tuple[str, str, float, float]]  # (stream, name, start, end)

    def trace(self) -> dict:
        """The timeline as Chrome trace events (microseconds)."""
        streams = {"compute": 1, "d2h": 2, "h2d": 3}
        events = [{"name": name, "ph": "X", "pid": 0, "tid": streams[stream],
                   "ts": start * 1e6, "dur": (end - start) * 1e6}
                  for stream, name, start, end in self.events]
        events += [{"name": "thread_name", "ph": "M", "pid": 0, "tid": tid,
                    "args": {"name": stream}} for stream, tid in streams.items()]
        events += [{"name": "device memory", "ph": "C", "pid": 0, "ts": t * 1e6,
                    "args": {"bytes": m}} for t, m in zip(self.times, self.memory, strict=True)]
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def write_trace(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.trace(), f)


def op_seconds(profile: NetworkProfile, spec: HardwareSpec) -> list[float]:
    """Each operator's compute time, launch included (see the module docstring)."""
    timeline = profile.timeline
    if not profile.timed and len(timeline.flops) == len(timeline.memory):
        rates = {"tf32": spec.tf32_rate or spec.compute_rate,
                 "half": spec.half_rate or spec.compute_rate}
        bandwidth = spec.memory_bandwidth
        return [max(flops / rates.get(dense, spec.compute_rate),
                    moved / bandwidth if bandwidth else 0.0) + LAUNCH_S
                for flops, moved, dense in zip(timeline.flops, timeline.moved, timeline.dense,
                                               strict=True)]
    counts: dict[tuple[int, bool], int] = {}
    for op, layer in enumerate(timeline.layer):
        key = (layer, op >= timeline.backward_from)
        counts[key] = counts.get(key, 0) + 1
    seconds = []
    for op, index in enumerate(timeline.layer):
        backward = op >= timeline.backward_from
        share = 0.0
        if index >= 0:
            layer = profile.layers[index]
            if profile.timed:
                ms = layer.backward_ms if backward else layer.forward_ms
                total = ms / 1e3
            else:
                flops = layer.backward_flops if backward else layer.forward_flops
                total = flops / spec.compute_rate
            share = total / counts[(index, backward)]
        seconds.append(share + LAUNCH_S)
    return seconds


def block_seconds(profile: NetworkProfile, block, seconds: list[float]) -> float:
    """The forward time of ``block``'s layers (one run of it again), from ``seconds``."""
    timeline, layers = profile.timeline, block.layers
    return sum(t for op, t in enumerate(seconds[: timeline.backward_from])
               if timeline.layer[op] in layers)


class _Link:
    """One copy direction: a queue of copies at a bandwidth."""

    def __init__(self, name: str, bandwidth: float) -> None:
        self.name, self.bandwidth, self.free_at, self.busy = name, bandwidth, 0.0, 0.0
        self.spans: list[tuple[float, float]] = []

    def copy(self, ready: float, nbytes: int, other: _Link, events: list, label: str) -> float:
        start = max(self.free_at, ready)
        overlapping = any(s < start + nbytes / self.bandwidth and e > start
                          for s, e in other.spans[-4:])
        end = start + nbytes / (self.bandwidth * (DUPLEX if overlapping else 1.0))
        self.free_at = end
        self.busy += end - start
        self.spans.append((start, end))
        events.append((self.name, label, start, end))
        return end


def simulate(profile: NetworkProfile, plan: Plan, spec: HardwareSpec,
             recomputed=()) -> Simulation:
    """Predict one training step of ``plan`` (made from ``profile``, with the blocks
    ``recomputed`` considered recomputed, see the module docstring) on ``spec``."""
    layer_segment = segment_of_layers(profile.layers)
    model = MemoryModel(profile, layer_segment, plan.min_bytes, plan.resident_bytes,
                        recomputed)
    offloaded = [i for i, d in enumerate(plan.saves) if d.action == OFFLOAD]
    distance = plan.prefetch_distance
    seconds = op_seconds(profile, spec)
    for block in recomputed:
        seconds[model.recompute_at(profile, block)] += block_seconds(profile, block, seconds)
    d2h, h2d = _Link("d2h", spec.d2h_bandwidth), _Link("h2d", spec.h2d_bandwidth)
    events: list[tuple[str, str, float, float]] = []
    by_saved = {}  # operator -> offloaded saves it produces
    by_issue = {}  # operator -> offloaded saves whose prefetch it issues
    by_need = {}  # operator -> offloaded saves it waits for
    for i in offloaded:
        save = model.saves[i]
        by_saved.setdefault(save.saved_at, []).append(i)
        issue = min(model.prefetch_at(model.segment[i], distance), save.needed_at)
        by_issue.setdefault(issue, []).append(i)
        by_need.setdefault(save.needed_at, []).append(i)
    end_of = {}  # offloaded save -> operator from which the curve has its bytes back
    ends, released = {}, {}  # operator -> saves that come back / are let go of there
    for i in offloaded:
        save = model.saves[i]
        end = min(model.prefetch_at(model.segment[i], distance), save.needed_at)
        if save.released_at < end:
            end_of[i] = end
            released.setdefault(save.released_at, []).append(i)
            ends.setdefault(end, []).append(i)
    curve = model.curve(offloaded, distance).tolist()
    target = plan.target
    out_done, back_done, times, memory = {}, {}, [], []
    pending: list[tuple[float, int]] = []  # (copy out done, save): released, not yet freed
    late: dict[int, int] = {}  # those saves' bytes, still on the device
    now = stall = 0.0
    layer_names = [layer.name for layer in profile.layers]
    for op, duration in enumerate(seconds):
        for i in ends.get(op, ()):
            late.pop(i, None)
        for i in released.get(op, ()):
            if i in out_done:  # else it is pushed once its copy out starts
                _hold(pending, late, i, out_done[i], model.saves[i].nbytes, now)
        extra = _settle(pending, late, now)
        if target is not None and curve[op] + extra > target and pending:
            # The allocator has no free block: compute waits for copies out to finish.
            waited = now
            while pending and curve[op] + extra > target:
                now = max(now, pending[0][0])
                extra = _settle(pending, late, now)
            stall += now - waited
        for i in by_issue.get(op, ()):
            back_done[i] = h2d.copy(max(now, out_done.get(i, now)), plan.saves[i].link_bytes,
                                    d2h, events, f"prefetch {plan.saves[i].layer}")
        waits = [back_done[i] for i in by_need.get(op, ()) if i in back_done]
        if waits and max(waits) > now:
            stall += max(waits) - now
            now = max(waits)
        times.append(now)
        memory.append(curve[op] + _settle(pending, late, now))
        index = profile.timeline.layer[op]
        events.append(("compute", layer_names[index] if index >= 0 else "loss", now,
                       now + duration))
        now += duration
        for i in by_saved.get(op, ()):
            out_done[i] = d2h.copy(now, plan.saves[i].link_bytes, h2d, events,
                                   f"offload {plan.saves[i].layer}")
            if i in end_of and model.saves[i].released_at <= op < end_of[i]:
                _hold(pending, late, i, out_done[i], model.saves[i].nbytes, now)
    return Simulation(iteration_s=now, compute_s=sum(seconds), d2h_s=d2h.busy, h2d_s=h2d.busy,
                      stall_s=stall, peak_bytes=max(memory, default=0), times=times,
                      memory=memory, events=_merged(events))


def _hold(pending: list, late: dict, i: int, done: float, nbytes: int, now: float) -> None:
    if done > now:
        heapq.heappush(pending, (done, i))
        late[i] = nbytes


def _settle(pending: list, late: dict, now: float) -> int:
    """Free the released saves whose copy out is done by ``now``; the bytes still held."""
    while pending and pending[0][0] <= now:
        late.pop(heapq.heappop(pending)[1], None)
    return sum(late.values())


def _merged(events: list) -> list:
    """Consecutive compute events of the same layer as one span (a readable trace)."""
    merged: list = []
    for event in events:
        last = merged[-1] if merged else None
        if last and event[0] == "compute" and last[0] == "compute" and last[1] == event[1]:
            merged[-1] = (last[0], last[1], last[2], event[3])
        else:
            merged.append(event)
    return merged
