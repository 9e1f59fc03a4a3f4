"""Floating-point operation counts for aten operators, forward and backward alike.

Matrix products and convolutions (forward and ``convolution_backward``) use PyTorch's own
formulas (``torch.utils.flop_counter``), which count one multiply-add as two FLOPs. Every
other operator is memory-bound in a CNN; it is counted as one FLOP per element of its largest
tensor argument or result, and views as none. That is an estimate of work, not of time.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

__all__ = ["count_flops"]


def count_flops(func: torch._ops.OpOverload, args: tuple, kwargs: dict, out) -> int:
    """FLOPs of one call of ``func`` that produced ``out``."""
    formula = flop_registry.get(func._overloadpacket)
    if formula is not None:
        return int(formula(*args, **kwargs, out_val=out))
    if func.is_view or func.namespace == "prim":  # views; fake tensors' metadata queries
        return 0
    tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
    return max((t.numel() for t in tensors), default=0)
