"""Transfer backends: how bytes cross the host link.

One interface (:class:`TransferBackend`) for the executor; implementations in order of
preference: ``native`` (the csrc extension), ``cupy``, ``torch`` (pinned tensors and
non-blocking copies on dedicated streams). Only ``torch`` is built so far.

Example::

    >>> from vmem import transfer
    >>> transfer.backends()
    ['torch']
"""

from __future__ import annotations

import torch

from .base import TransferBackend
from .torch_backend import TorchBackend

__all__ = ["TransferBackend", "TorchBackend", "backends", "make_backend"]

_BACKENDS = {"torch": TorchBackend}


def backends() -> list[str]:
    """The backends available in this installation, best first."""
    return list(_BACKENDS)


def make_backend(name: str, device: torch.device) -> TransferBackend:
    """The backend ``name`` (or the best available for ``"auto"``) for ``device``."""
    if name == "auto":
        name = backends()[0]
    if name not in _BACKENDS:
        raise ValueError(f"transfer backend {name!r} is not available here (available: "
                         f"{', '.join(backends())}); set VMEM_BACKEND=auto or torch")
    return _BACKENDS[name](device)
