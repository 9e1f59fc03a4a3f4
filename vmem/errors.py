"""The two exceptions vmem raises about device memory."""

from __future__ import annotations

__all__ = ["BudgetTooSmall", "OutOfBudget", "format_bytes"]


def format_bytes(n: int | float) -> str:
    """Human-readable binary size: ``format_bytes(3 * 2**30) == '3.00 GiB'``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


class OutOfBudget(RuntimeError):
    """Device memory in use went over the budget while an operation ran.

    Attributes:
        layer: the layer (or, outside a known layer, the aten operator) that crossed the limit.
        used: bytes in use after the operation.
        limit: the budget in bytes.
    """

    def __init__(self, layer: str, used: int, limit: int) -> None:
        self.layer, self.used, self.limit = layer, used, limit
        super().__init__(
            f"device memory budget exceeded in {layer}: {format_bytes(used)} in use "
            f"({used} bytes) > budget {format_bytes(limit)} ({limit} bytes); "
            "raise the budget (budget= or VMEM_DEVICE_BUDGET) or lower the batch size"
        )


class BudgetTooSmall(ValueError):
    """No plan keeps the peak under the budget; raised before training starts.

    Attributes:
        minimum: the smallest budget in bytes that a plan can keep.
        layer: the layer whose working set binds that minimum.
        budget: the budget that was asked for, in bytes.
    """

    def __init__(self, budget: int, minimum: int, layer: str) -> None:
        self.budget, self.minimum, self.layer = budget, minimum, layer
        super().__init__(
            f"a device budget of {format_bytes(budget)} ({budget} bytes) is too small: the "
            f"smallest that works is {format_bytes(minimum)} ({minimum} bytes), bound by "
            f"layer {layer}; pass budget>={minimum} or lower the batch size"
        )
