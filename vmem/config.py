"""vmem's configuration: explicit arguments > ``VMEM_*`` environment variables > defaults."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["Config", "parse_size", "POLICIES", "BACKENDS", "LOG_LEVELS"]

POLICIES = ("auto", "none", "vdnn_all", "vdnn_conv", "recompute", "split_approx")
BACKENDS = ("auto", "native", "cupy", "torch")
LOG_LEVELS = ("debug", "info", "warning", "error")

_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(-?(?:\d+(?:\.\d*)?|\.\d+))\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | float | str, name: str) -> int | float:
    """Parse a memory size: bytes, a size string, or a fraction of the whole.

    Returns an ``int`` number of bytes, or a ``float`` in (0, 1] meaning that fraction of the
    device's (or host's) memory. ``name`` is what error messages call the value.

    Example::

        >>> parse_size("8GiB", "budget"), parse_size("8000MB", "b"), parse_size("0.5", "b")
        (8589934592, 8000000000, 0.5)
    """
    hint = "use a size, e.g. '8GiB' or '8000MB', bytes (8589934592), or a fraction like '0.5'"
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not a size; {hint}")
    if isinstance(value, (int, float)):
        number, unit = value, ""
    elif isinstance(value, str) and (match := _SIZE.match(value)):
        text, unit = match.groups()
        number = float(text) if "." in text else int(text)
    else:
        raise ValueError(f"{name}={value!r} is not a size; {hint}")
    if unit.lower() not in _UNITS and unit:
        raise ValueError(f"{name}={value!r} has an unknown unit {unit!r}; {hint}")
    if number <= 0:
        raise ValueError(f"{name}={value!r} must be positive; {hint}")
    if unit:
        return int(number * _UNITS[unit.lower()])
    if isinstance(number, float):
        if number > 1:
            raise ValueError(
                f"{name}={value!r}: a number with a fraction part is a fraction of memory and "
                f"must be at most 1; {hint}"
            )
        return number
    return int(number)


def _choice(value: str, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(
            f"{name}={value!r} is not one of {', '.join(choices)}; e.g. {choices[0]!r}")
    return value


def _positive_int(value: int | str, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if isinstance(value, bool) or number < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer, e.g. 2")
    return number


def _count(value: int | str, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = -1
    if isinstance(value, bool) or number < 0:
        raise ValueError(f"{name}={value!r} must be 0 or a positive integer, e.g. 3")
    return number


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a vmem session can be told; frozen, validated on construction.

    Build it with :meth:`Config.from_env`, which applies explicit arguments over ``VMEM_*``
    environment variables over these defaults.

    Example::

        >>> cfg = Config.from_env(device_budget="8GiB", env={})
        >>> cfg.device_budget, cfg.policy
        (8589934592, None)
    """

    # Device budget: bytes (int), a fraction of device memory (float in (0, 1]), or None for
    # no budget at all. VMEM_DEVICE_BUDGET.
    device_budget: int | float | None = None
    # Cap on the pinned host pool: bytes, a fraction of host memory, or None for no cap.
    # VMEM_HOST_BUDGET.
    host_budget: int | float | None = None
    # Which saved tensors to offload: auto (the planner), none, vdnn_all (every saved
    # activation), vdnn_conv (convolution inputs only), recompute (every run of convolution
    # layers recomputed in backward from its input), split_approx (auto, with Split-CNN's
    # approximate splitting, which changes the function); None: auto when there is a budget,
    # otherwise vmem changes nothing. VMEM_POLICY.
    policy: str | None = None
    # Most parts a run of layers is split into when offloading alone does not fit (auto and
    # split_approx); 1 never splits (bit-identical results); None: 32. VMEM_SPLIT.
    split: int | None = None
    # How many segments ahead of backward to prefetch; None lets the planner choose.
    # VMEM_PREFETCH_DEPTH.
    prefetch_depth: int | None = None
    # Steps timed per layer (after one warm-up) before auto re-plans once with the measured
    # times, adopting the new plan when its predicted step is more than 5% faster; 0 never;
    # None: 3 on a GPU, 0 on the emulated device (whose copies are not measured).
    # VMEM_REFINE_STEPS.
    refine_steps: int | None = None
    # Transfer backend: auto (best available), native (csrc), cupy, torch. VMEM_BACKEND.
    backend: str = "auto"
    # Path of a JSON report written when a session ends; None writes none. VMEM_REPORT.
    report: str | None = None
    # Level of vmem's log messages (logger "vmem"). VMEM_LOG.
    log: str = "warning"

    _ENV = {
        "device_budget": "VMEM_DEVICE_BUDGET",
        "host_budget": "VMEM_HOST_BUDGET",
        "policy": "VMEM_POLICY",
        "split": "VMEM_SPLIT",
        "prefetch_depth": "VMEM_PREFETCH_DEPTH",
        "refine_steps": "VMEM_REFINE_STEPS",
        "backend": "VMEM_BACKEND",
        "report": "VMEM_REPORT",
        "log": "VMEM_LOG",
    }

    def __post_init__(self) -> None:
        self._check("device_budget", lambda v, n: parse_size(v, n), optional=True)
        self._check("host_budget", lambda v, n: parse_size(v, n), optional=True)
        self._check("policy", lambda v, n: _choice(v, n, POLICIES), optional=True)
        self._check("prefetch_depth", _positive_int, optional=True)
        self._check("split", _positive_int, optional=True)
        self._check("refine_steps", _count, optional=True)
        self._check("backend", lambda v, n: _choice(v, n, BACKENDS))
        self._check("log", lambda v, n: _choice(str(v).lower(), n, LOG_LEVELS))

    def _check(self, field: str, parse, optional: bool = False) -> None:
        value = getattr(self, field)
        if value is None and optional:
            return
        object.__setattr__(self, field, parse(value, field))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **explicit: Any) -> Config:
        """Build a Config from explicit arguments, then ``VMEM_*`` variables, then defaults.

        An explicit argument of ``None`` counts as not given. A malformed environment value
        raises ``ValueError`` naming the variable.

        Example::

            >>> Config.from_env(env={"VMEM_DEVICE_BUDGET": "0.5"}).device_budget
            0.5
        """
        env = os.environ if env is None else env
        unknown = set(explicit) - set(cls._ENV)
        if unknown:
            raise TypeError(
                f"unknown vmem option(s) {sorted(unknown)}; known: {sorted(cls._ENV)}"
            )
        values: dict[str, Any] = {}
        for field, var in cls._ENV.items():
            if explicit.get(field) is not None:
                values[field] = explicit[field]
            elif env.get(var, "").strip():
                try:
                    values[field] = getattr(cls(**{field: env[var].strip()}), field)
                except ValueError as err:
                    raise ValueError(f"{var}: {err}".replace(f"{field}=", "", 1)) from None
        return cls(**values)

    def resolve_budget(self, total_bytes: int) -> int | None:
        """The device budget in bytes on a device of ``total_bytes``; None when unset.

        Raises ``ValueError`` when the budget is above the device's memory.
        """
        if self.device_budget is None:
            return None
        budget = self.device_budget
        if isinstance(budget, float):
            budget = int(budget * total_bytes)
        if budget > total_bytes:
            raise ValueError(
                f"device_budget={budget} bytes is above the device's memory ({total_bytes} "
                "bytes); pass a smaller budget or a fraction like 0.9"
            )
        return budget
