"""``vmem.session``: train an unchanged model within a device-memory budget.

The session plans on the first forward (or up front from ``sample``) and again whenever the
input's shape changes, and keeps one installed plan per input signature
(:func:`vmem.feedforward.install`); each forward runs under it. The first step under each
plan is traced (:mod:`vmem.preprocessing.trace`) and the session plans again from what it
shows. With ``auto``, once the first steps of an input signature have been timed per layer,
it re-plans once on the measured times (:mod:`vmem.refinement`). On exit, normal or by
exception, it leaves the model and the process as it found them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import weakref
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils._pytree import tree_flatten, tree_unflatten

from .config import Config, parse_size
from .control import Plan
from .control.planner import headroom_for, offload_everything
from .control.simulator import Simulation, simulate
from .control.splitting import MAX_PARTS
from .errors import BudgetTooSmall, format_bytes
from .feedforward import (
    HostPool,
    Installed,
    OffloadExecutor,
    Pools,
    StagingPool,
    TransferCounters,
    install,
)
from .meter import CudaMeter, DeviceMeter, EmulatedMeter
from .planning import CannotProfile, Planned, plan_model
from .preprocessing import NetworkProfile
from .preprocessing.hardware import detect_hardware
from .preprocessing.keys import ModuleScope
from .preprocessing.optimizer import profile_optimizer
from .preprocessing.trace import StepTrace
from .refinement import STEPS, Refinement
from .transfer import make_backend

__all__ = ["Session", "session"]

log = logging.getLogger("vmem")

CORRECTIONS = 3  # re-plans per input signature (shapes, dtypes, gradients held) for what a
# traced step showed (saves the plan did not know, bytes beyond its prediction), at most


def session(model: nn.Module, *, budget: int | float | str | None = None,
            policy: str | None = None, optimizer: torch.optim.Optimizer | None = None,
            sample: torch.Tensor | None = None, **config) -> Session:
    """Train ``model`` within a device-memory budget; use as a context manager.

    Args:
        model: the ``nn.Module`` to train, on its device (``cuda``, or ``cpu`` for the
            emulated device). It is not modified; hooks live only inside the ``with``.
        budget: bytes, a size (``"8GiB"``) or a fraction of device memory (``0.5``);
            default ``VMEM_DEVICE_BUDGET``. With neither a budget nor a policy the session
            changes nothing.
        policy: ``auto`` (default with a budget), ``none``, ``vdnn_all``, ``vdnn_conv``,
            ``recompute`` or ``split_approx``; default ``VMEM_POLICY``. When no offload plan
            fits, ``auto`` splits runs of convolutional layers into parts, exactly (the
            model computes the same function); ``split_approx`` does the same with
            Split-CNN's independent patches, which is cheaper but **changes the model's
            function**; opt in knowingly.
        optimizer: counted in the budget (its state and its step's peak) when given.
        sample: an input batch to plan from before the first forward.
        **config: any other :class:`vmem.Config` field (``host_budget``, ``split``,
            ``prefetch_depth``, ``refine_steps``, ``backend``, ``report``, ``log``).
            ``refine_steps``: with ``auto``, how many steps (after one warm-up) are timed
            per layer before the session re-plans on the measured times, adopting the new
            plan when it is predicted more than 5% faster; default 3 on a GPU, 0 (never)
            on the emulated device.

    Raises:
        vmem.BudgetTooSmall: no plan fits; raised before the first step runs.

    Example::

        >>> import torch, vmem
        >>> model = vmem.models.resnet18(num_classes=10)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
        >>> with vmem.session(model, optimizer=opt, budget="200MB") as s:
        ...     torch.nn.functional.cross_entropy(model(x), y).backward()
        ...     opt.step(); opt.zero_grad()
        >>> s.measured_peak <= 200 * 10**6
        True
    """
    return Session(model, budget=budget, policy=policy, optimizer=optimizer, sample=sample,
                   **config)


@dataclasses.dataclass
class _Signature:
    """What the session keeps of one input signature (shapes, dtypes, gradients held)."""

    installed: Installed  # the plan in force for it
    profile: NetworkProfile | None  # the plan's, timed once refined (the simulation's);
    # None: the model cannot run shape-only for it, and every tracked save is offloaded
    refinement: Refinement | None = None  # with auto: the re-plan on measured times
    tolerated: int = 0  # bytes in use at a step's start that no plan fitted, under which
    # the plan in force carries on (its safety net holds the budget)
    why: str = "first plan"  # what made the plan in force
    traced: bool = False  # whether the plan in force's first step has been traced
    pending: tuple[StepTrace, dict] | None = None  # that trace and its entry in
    # Session.traces, until the next step of this signature reads them
    excess: int = 0  # bytes traced steps held beyond their plans': planned as in use
    corrections: int = 0  # re-plans made for a traced excess


class Session:
    """The state of one ``with vmem.session(...)`` block; see :func:`session`."""

    def __init__(self, model: nn.Module, *, budget=None, policy=None, optimizer=None,
                 sample=None, **config) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"vmem.session needs a torch.nn.Module, got "
                            f"{type(model).__name__}; pass the model itself")
        self.model, self.optimizer, self.sample = model, optimizer, sample
        self.config = Config.from_env(device_budget=budget, policy=policy, **config)
        self.active = self.config.device_budget is not None or self.config.policy is not None
        self.policy = self.config.policy or "auto"
        self.device = _device_of(model)
        self.budget: int | None = None
        self.spec = None  # the device's HardwareSpec, once entered
        self.steps = 0
        self.measured_peak: int | None = None
        self._signatures: dict[tuple, _Signature] = {}  # every input signature planned
        self._planned_for: tuple | None = None  # the signature whose plan is in force
        self._counters = TransferCounters()
        self._handles: list = []
        self._forwarding: Installed | None = None  # whose forward is running
        self._last_call = None  # the latest forward's arguments, tensors by weak reference
        self._planning = False
        self._timing: Refinement | None = None  # whose timer is timing the step running
        self._trace: tuple[tuple, StepTrace, dict] | None = None  # the step being traced:
        # its signature, its trace, its entry in traces
        self.traces: list[dict] = []  # every traced step: its plan, predicted and measured
        steps = self.config.refine_steps
        self.refine_steps = steps if steps is not None else \
            STEPS if self.device.type == "cuda" else 0
        self._old_fraction: float | None = None
        self.meter: DeviceMeter | None = None
        self.scope: ModuleScope | None = None  # names each save (see [Note: Which save is it])

    @property
    def _current(self) -> _Signature | None:
        return self._signatures.get(self._planned_for)

    @property
    def plan(self) -> Plan | None:
        """The plan in force (for the latest forward's input signature); None before any."""
        return None if self._current is None else self._current.installed.plan

    @property
    def executor(self) -> OffloadExecutor | None:
        """The plan in force's offload executor; None before any plan."""
        return None if self._current is None else self._current.installed.executor

    # -- entering and leaving ---------------------------------------------------------
    def __enter__(self) -> Session:
        if not self.active:
            return self
        if self.device.type == "meta":
            raise ValueError("vmem.session needs a model on a real device (cuda, or cpu for "
                             "the emulated device), not on meta")
        logging.getLogger("vmem").setLevel(self.config.log.upper())
        self._forget_plans()  # a session object entered again starts afresh
        self.spec = detect_hardware(self.device)
        self.budget = self.config.resolve_budget(self.spec.total_memory)
        self.backend = make_backend(self.config.backend, self.device)
        try:
            self._start_meter()
            self.scope = ModuleScope(self.model)
            self.pools = Pools(HostPool(self._host_buffer, _host_limit(self.config.host_budget)),
                               StagingPool())
            self._handles = [
                self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                self.model.register_forward_hook(self._after_forward, always_call=True),
                register_optimizer_step_pre_hook(self._before_optimizer_step),
            ]
            if self.sample is not None:
                self._prepare((self.sample,), {})
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.active:
            self._restore()
            if self.config.report:
                with open(self.config.report, "w") as f:
                    json.dump(self.report_dict(), f, indent=1)
        return False  # the user's exception, if any, propagates unchanged

    def _forget_plans(self) -> None:
        """Drop what an earlier ``with`` of this session planned: its executors hold that
        block's meter and pools. (Counters and steps add up over the blocks.)"""
        self._signatures.clear()
        self._planned_for = self.measured_peak = self._trace = self._last_call = None
        self.traces = []

    def _start_meter(self) -> None:
        self.meter = DeviceMeter.for_device(self.device, self.budget,
                                            lambda: f"near {self.executor.layer}"
                                            if self.executor else None)
        if isinstance(self.meter, CudaMeter):
            self.meter.reset_peak()
            if self.budget is not None:
                self._old_fraction = _memory_fraction(self.device)
                total = torch.cuda.get_device_properties(self.device).total_memory
                torch.cuda.set_per_process_memory_fraction(self.budget / total, self.device)
            return
        self.meter.__enter__()
        self.meter.track(_held_tensors(self.model, self.optimizer))
        self.backend.scratch = self.meter.paused  # the CPU reference's temporaries

    def _restore(self) -> None:
        """Undo everything: hooks, saved-tensor hooks, streams, pools, fraction, meter."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._end_forward()
        if self.scope is not None:
            self.scope.remove()
            self.scope = None
        self._stop_timing()
        self._finish_trace()
        for signature in self._signatures.values():
            signature.installed.uninstall()
        if getattr(self, "pools", None) is not None:
            self.pools.host.release()
            self.backend.release()
        if self.meter is not None:
            self.measured_peak = self.meter.peak
            if isinstance(self.meter, EmulatedMeter):
                self.meter.__exit__(None, None, None)
        if self._old_fraction is not None:
            torch.cuda.set_per_process_memory_fraction(self._old_fraction, self.device)
            self._old_fraction = None

    # -- every forward ----------------------------------------------------------------
    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._planning or not torch.is_grad_enabled():
            return
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if not inputs:
            return
        if isinstance(self.meter, EmulatedMeter):
            self.meter.track(inputs)
        self._end_forward()  # left open if the last forward was interrupted
        self._stop_timing()  # before planning: the profiler runs the model's modules
        self._prepare(args, kwargs)
        new_step = self.executor.step_over
        if new_step:  # before the layer timer starts: planning runs the model
            self._finish_trace()
            self._fit_to_bytes_in_use(args, kwargs)
            self.steps += 1
        self._refine_or_time(args, kwargs)  # may install a plan: the trace is of the one run
        if new_step:
            self._start_trace()
        self._forwarding = self._current.installed
        self._forwarding.start_forward(inputs)
        leaves, spec = tree_flatten((args, kwargs))
        self._last_call = spec, [weakref.ref(t) if isinstance(t, torch.Tensor) else t
                                 for t in leaves]

    def _before_optimizer_step(self, optimizer, args, kwargs) -> None:
        """An optimizer of this model steps, and the session was not given one: plan with it
        from now on. Before its first step (no state yet) check that the plans to come, with
        its state on the device, still fit: if not, refuse before any parameter changes."""
        if self.optimizer is not None or self._planning or self.plan is None:
            return
        ours = {id(p) for p in self.model.parameters()}
        if not any(id(p) in ours for group in optimizer.param_groups
                   for p in group["params"]):
            return  # another model's
        self.optimizer = optimizer
        log.info("vmem: %s steps this model: its state and step count in the plans from now "
                 "on (pass optimizer= to plan with it from the first step)",
                 type(optimizer).__name__)
        call = self._last_forward_call()
        if any(optimizer.state.values()) or call is None or self.plan.budget is None:
            return
        self._plan(self._planned_for, *call, forwards=self.plan.forwards)  # may refuse

    def _last_forward_call(self) -> tuple[tuple, dict] | None:
        """The latest forward's ``(args, kwargs)``, if the loop still holds its tensors."""
        if self._last_call is None:
            return None
        spec, leaves = self._last_call
        leaves = [leaf() if isinstance(leaf, weakref.ref) else leaf for leaf in leaves]
        if any(leaf is None for leaf in leaves):
            return None
        return tree_unflatten(leaves, spec)

    def _after_forward(self, module: nn.Module, args, output) -> None:
        self._end_forward()
        if self._timing is not None:
            self._timing.timer.end_forward()

    def _end_forward(self) -> None:
        if self._forwarding is not None:
            self._forwarding.end_forward()
            self._forwarding = None

    def _prepare(self, args: tuple, kwargs: dict) -> None:
        """Plan for inputs like these unless the current plan already is for them."""
        key = _signature(self.model, args, kwargs)
        if key == self._planned_for:
            return
        if key in self._signatures:  # planned before (accumulation alternates two plans)
            self._switch_to(key)
            return
        planned = self._plan(key, args, kwargs)
        self._install(key, planned, args, kwargs)
        if self.refine_steps and self.policy == "auto" and planned.profile is not None:
            self._current.refinement = Refinement(self.model, planned, self.device,
                                                  self.refine_steps)

    def _start_trace(self) -> None:
        """Trace this step if it is the first under the plan in force (see
        :mod:`vmem.preprocessing.trace`)."""
        if self._current.traced:
            return
        self._current.traced = True
        trace = StepTrace(self.meter.current, self.plan.predicted_peak)
        entry = {"step": self.steps, "plan": self._current.why}
        self._trace, self.executor.trace = (self._planned_for, trace, entry), trace
        self.meter.start_window()
        self.traces.append(entry)

    def _finish_trace(self) -> None:
        """The traced step is over (the next one starts, or the session ends)."""
        if self._trace is None:
            return
        key, trace, entry = self._trace
        signature = self._signatures[key]
        trace.finish(self.meter.window_peak, signature.installed.executor.forwards)
        signature.installed.executor.trace = None
        signature.pending, self._trace = (trace, entry), None
        entry.update(trace.to_dict())
        log.info("vmem: step %d: predicted peak %s, measured %s", entry["step"],
                 format_bytes(trace.predicted_peak), format_bytes(trace.peak))

    def _fit_to_bytes_in_use(self, args: tuple, kwargs: dict) -> None:
        """Re-plan when a step starts with more device bytes in use than the plan assumed
        (the optimizer's state after its first step, a tensor the loop now holds), runs
        more forwards, or held more than its plan predicted when it was traced."""
        signature = self._current
        trace, entry = signature.pending or (None, None)
        signature.pending = None
        current = self.meter.current
        assumed = self.plan.start_bytes - signature.excess  # what was really to be in use
        grown = current - max(assumed, signature.tolerated)
        forwards = max(self.plan.forwards, self.executor.forwards)  # of the step just over
        # A plan that offloads every tracked save (the model cannot run shape-only) has
        # nothing to learn from them.
        correct = trace is not None and signature.corrections < CORRECTIONS and \
            signature.profile is not None
        # A step whose saves the plan did not know tells nothing of the plan's forecast.
        excess = trace.excess(assumed, current) if correct and not trace.unplanned else 0
        if entry is not None:
            entry["excess_bytes"] = excess
        if self.plan.budget is None:
            return
        slack = max(self.plan.budget // 100, 2**16)
        reasons = [f"{format_bytes(grown)} more in use as the step starts"] if grown > slack \
            else []
        if forwards != self.plan.forwards:
            reasons.append(f"{forwards} forward(s) per step")
        if excess > slack:
            reasons.append(f"the traced step held {format_bytes(excess)} beyond the plan")
            signature.excess += excess
        if correct and trace.unplanned:  # the profile saw another step (autocast, a hook)
            reasons.append(f"{trace.unplanned} of the traced step's {len(trace.saves)} "
                           "saves unknown to the plan")
        if correct and (excess > slack or trace.unplanned):
            signature.corrections += 1
        if not reasons:
            return
        why = "planned again: " + ", ".join(reasons)
        log.info("vmem: %s", why)
        try:
            planned = self._plan(self._planned_for, args, kwargs, forwards=forwards)
        except BudgetTooSmall as error:  # training has begun: the safety net carries on
            signature.tolerated = current
            log.warning("vmem: no plan fits what is in use on the device now (%s); training "
                        "goes on under the plan in force and its safety net", error)
            return
        self._install(self._planned_for, planned, args, kwargs, why)

    def _refine_or_time(self, args: tuple, kwargs: dict) -> None:
        """Time this step for its signature's refinement, or re-plan once it has enough."""
        refinement = self._current.refinement
        if refinement is None or refinement.outcome is not None:
            return
        if not refinement.ready:
            self._timing = refinement
            refinement.timer.start_step()
            self.executor.density_samples = refinement.sampling()
            return
        retime = refinement.retime()
        try:
            best = self._plan(self._planned_for, args, kwargs, retime=retime,
                              forwards=self.plan.forwards)
        except Exception as error:  # noqa: BLE001 -- training goes on under the plan in force
            refinement.give_up(error)
            log.warning("vmem: %s", refinement.summary())
            return
        if refinement.decide(best, self.spec, retime):
            self._install(self._planned_for, best, args, kwargs, "refined on measured times")
        else:
            self._current.profile = refinement.timed_profile
        log.info("vmem: %s", refinement.summary())

    def _stop_timing(self) -> None:
        if self._timing is not None:
            self._timing.timer.stop()
            self._timing = None
        for signature in self._signatures.values():  # sampling only while timing
            signature.installed.executor.density_samples = None

    def _plan(self, key: tuple, args, kwargs, retime=None, forwards: int = 1) -> Planned:
        """The plan for inputs of signature ``key``, made with the meter paused, the model's
        hooks quiet and the model as the user wrote it (the plan in force's runs taken out
        meanwhile). The model's own forward has started (we run in its pre-hook), so only
        runs in its submodules can be split."""
        paused = self.meter.paused() if isinstance(self.meter, EmulatedMeter) else \
            contextlib.nullcontext()
        current = self._current
        if current is not None:
            current.installed.deactivate()
        self._planning = True
        try:
            with paused:
                known = self._signatures.get(key)
                if known is not None and known.profile is None:
                    return self._unprofiled_plan(forwards)
                return self._plan_model(args, kwargs, key[1], retime, forwards,
                                        0 if known is None else known.excess)
        except CannotProfile as error:  # e.g. data-dependent control flow
            log.warning("vmem: %s cannot run shape-only (%s); every tracked save is offloaded "
                        "instead, within the budget", type(self.model).__name__,
                        str(error).splitlines()[0])
            return self._unprofiled_plan(forwards)
        finally:
            self._planning = False
            if current is not None:
                current.installed.activate()

    def _unprofiled_plan(self, forwards: int) -> Planned:
        plan = offload_everything(self.budget, headroom_for(self.device.type),
                                  self.meter.current)
        return Planned(dataclasses.replace(plan, forwards=forwards), None)

    def _plan_model(self, args, kwargs, gradients_held, retime, forwards,
                    excess: int) -> Planned:
        return plan_model(
            self.model, args, kwargs, budget=self.budget, policy=self.policy,
            headroom=headroom_for(self.device.type),
            optimizer=profile_optimizer(self.optimizer) if self.optimizer else None,
            gradients_held=gradients_held, prefetch_distance=self.config.prefetch_depth,
            max_parts=self.config.split or MAX_PARTS, top_level_runs=False, spec=self.spec,
            retime=retime, compress=self.backend.compresses,
            outside_bytes=self._outside_bytes(args, kwargs) + excess,
            forwards=forwards)

    def _outside_bytes(self, args, kwargs) -> int:
        """Device bytes in use that the profile and the optimizer's profile do not count:
        whatever the loop holds besides the model, its gradients, the optimizer's state and
        this forward's inputs (a dataset on the device that the inputs are sliced from,
        another model, the optimizer's state when the session was not given the optimizer).
        """
        counted: dict[int, int] = {}
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        for t in [*self.model.parameters(), *self.model.buffers(), *grads,
                  *_optimizer_state(self.optimizer)]:
            if t.device == self.device:
                counted[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
                  and t.device == self.device and t.untyped_storage()._cdata not in counted]
        profiled = sum(counted.values()) + sum(t.numel() * t.element_size() for t in inputs)
        return max(0, self.meter.current - profiled)

    def _install(self, key, planned: Planned, args, kwargs, why: str = "first plan") -> None:
        """Put ``planned.plan`` in force for inputs of signature ``key`` (new, or replacing
        its plan: copies in flight belong to the old executor's graphs, which keep it)."""
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        installed = install(self.model, planned.plan, self.pools, self.backend,
                            scope=self.scope, device=self.device,
                            counters=self._counters, meter=self.meter)
        if self._current is not None:
            self._current.installed.deactivate()
        old = self._signatures.get(key)  # re-planned: its refinement and tolerance carry on
        self._signatures[key] = _Signature(installed, planned.profile, why=why) \
            if old is None else dataclasses.replace(old, installed=installed,
                                                    profile=planned.profile, why=why,
                                                    traced=False)
        self._switch_to(key)
        log.info("vmem: planned for inputs %s:\n%s", [list(t.shape) for t in inputs],
                 planned.plan.table())

    def _switch_to(self, key) -> None:
        """Put signature ``key``'s installed plan in force instead of the current one.
        (No synchronisation: copies in flight belong to their graphs, stream-ordered.)"""
        if self._current is not None and self._planned_for != key:
            self._current.installed.deactivate()
        self._planned_for = key
        self._current.installed.activate()

    def _host_buffer(self, nbytes: int) -> torch.Tensor:
        if not isinstance(self.meter, EmulatedMeter):
            return self.backend.host_buffer(nbytes)
        with self.meter.paused():  # host memory, though on the emulated device it is cpu too
            buffer = self.backend.host_buffer(nbytes)
        self.meter.exclude(buffer)
        return buffer

    # -- what happened ----------------------------------------------------------------
    def simulation(self) -> Simulation | None:
        """The plan in force on the timeline simulator, with the layer times it was made from
        (measured ones once refined); None before the first plan. Its ``iteration_s`` is
        the predicted step time, ``write_trace(path)`` writes a Chrome/Perfetto trace.

        Example::

            >>> import torch, vmem
            >>> model = vmem.models.resnet18(num_classes=10)
            >>> with vmem.session(model, budget="1GiB", sample=torch.randn(2, 3, 32, 32)) as s:
            ...     s.simulation().iteration_s > 0
            True
        """
        if self.plan is None or self._current.profile is None:
            return None
        return simulate(self._current.profile, self.plan, self.spec)

    @property
    def peak(self) -> int | None:
        """Device bytes at the peak so far (measured)."""
        if self.measured_peak is not None:
            return self.measured_peak
        return None if self.meter is None else self.meter.peak

    def report_dict(self) -> dict:
        data = {"policy": self.policy, "device": str(self.device), "budget": self.budget,
                "steps": self.steps, "measured_peak": self.peak}
        if self.plan is not None:
            data["plan"] = json.loads(self.plan.to_json())
            data["predicted_peak"] = self.plan.predicted_peak
            data["host_pool"] = dataclasses.asdict(self.pools.host.stats)
            data["staging"] = dataclasses.asdict(self.pools.staging.stats)
            data["offloaded_bytes"] = self.executor.offloaded_bytes
            data["prefetched_bytes"] = self.executor.prefetched_bytes
            data["reused_bytes"] = self.executor.reused_bytes
            data["compressed_saves"] = self.executor.counters.compressed_saves
            data["safety_net"] = {k: getattr(self._counters, k) for k in (
                "forced_offloads", "forced_bytes", "evicted_saves", "evicted_bytes",
                "unplanned_saves", "held_prefetches")}
            data["traced_steps"] = self.traces
            data["backend"] = self.backend.name
            arena = getattr(self.backend, "arena", None)  # the native backend's
            data["native_arena"] = None if arena is None else arena.stats()
            refinement = self._current.refinement
            data["refinement"] = None if refinement is None else refinement.to_dict()
        return data

    def report(self) -> str:
        """The plan, predicted against measured peak, and pool statistics, for people."""
        if not self.active:
            return "vmem session: no budget and no policy, nothing changed"
        if self.plan is None:
            return "vmem session: no forward pass ran, nothing planned"
        host, staging = self.pools.host.stats, self.pools.staging.stats
        measured = self.peak or 0
        error = (self.plan.predicted_peak - measured) / measured * 100 if measured else 0.0
        return "\n".join([
            f"vmem session on {self.device}, {self.steps} step(s)",
            self.plan.table(),
            f"measured peak {format_bytes(measured)} ({measured} bytes); predicted "
            f"{error:+.1f}% against it",
            f"host pool: {format_bytes(host.capacity)} arena, peak in use "
            f"{format_bytes(host.peak_in_use)}, {host.arena_allocations} arena and "
            f"{host.overflow_allocations} extra allocation(s), {host.slices} slices",
            f"staging: peak {format_bytes(staging.peak_in_use)}, {staging.prefetched} "
            f"prefetched ahead, {staging.on_demand} on demand",
            f"transfers: {format_bytes(self.executor.offloaded_bytes)} offloaded, "
            f"{format_bytes(self.executor.prefetched_bytes)} fetched back, "
            f"{format_bytes(self.executor.reused_bytes)} still on the device when needed, "
            f"{self.executor.counters.compressed_saves} offload(s) compressed; "
            f"{self.backend.name} transfer backend",
            f"safety net: {self._counters.forced_offloads} save(s) offloaded that the plan "
            f"kept ({format_bytes(self._counters.forced_bytes)}), "
            f"{self._counters.evicted_saves} kept save(s) offloaded later "
            f"({format_bytes(self._counters.evicted_bytes)}), "
            f"{self._counters.unplanned_saves} save(s) the plan did not know, "
            f"{self._counters.held_prefetches} prefetch(es) left to backward's demand",
            *map(_traced_line, self.traces),
            self._refinement_summary(),
        ])

    def _refinement_summary(self) -> str:
        refinement = self._current.refinement
        if refinement is not None:
            return refinement.summary()
        if self.policy != "auto":
            return f"refinement: off (only auto chooses by time; policy {self.policy})"
        return "refinement: off (refine_steps=0)"


def _traced_line(traced: dict) -> str:
    """One traced step of :attr:`Session.traces`, for people."""
    if traced.get("measured_peak") is None:
        return f"step {traced['step']} ({traced['plan']}): traced, not over"
    line = (f"step {traced['step']} ({traced['plan']}): predicted peak "
            f"{format_bytes(traced['predicted_peak'])}, measured "
            f"{format_bytes(traced['measured_peak'])}; {traced['unplanned_saves']} of "
            f"{traced['saves']} tracked save(s) unknown to the plan")
    if traced.get("excess_bytes"):
        line += f"; {format_bytes(traced['excess_bytes'])} beyond the plan"
    return line


def _signature(model: nn.Module, args: tuple, kwargs: dict) -> tuple:
    """What a plan is for: the inputs' shapes and dtypes, and whether gradients are held."""
    inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    gradients_held = any(p.grad is not None for p in model.parameters())
    return tuple((tuple(t.shape), t.dtype) for t in inputs), gradients_held


def _device_of(model: nn.Module) -> torch.device:
    for t in [*model.parameters(), *model.buffers()]:
        return t.device
    return torch.device("cpu")


def _held_tensors(model: nn.Module, optimizer) -> Iterable[torch.Tensor]:
    """What is on the device before the first step: parameters, gradients, buffers, state."""
    yield from model.parameters()
    yield from model.buffers()
    yield from (p.grad for p in model.parameters() if p.grad is not None)
    yield from _optimizer_state(optimizer)


def _optimizer_state(optimizer) -> Iterable[torch.Tensor]:
    if optimizer is not None:
        for state in optimizer.state.values():
            yield from (t for t in state.values() if isinstance(t, torch.Tensor))


def _memory_fraction(device: torch.device) -> float:
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    return getter(device) if getter else 1.0


def _host_limit(host_budget: int | float | None) -> int | None:
    if host_budget is None or isinstance(host_budget, int):
        return host_budget
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(parse_size(host_budget, "host_budget") * total)
