"""Transfer backends: how bytes cross the host link.

One interface (:class:`TransferBackend`) for the executor; implementations in order of
preference: ``native`` (the csrc library, :mod:`.native`: pinned arena, batched copies,
zero-value compression), ``cupy`` (cupy's runtime API and pinned memory pool), ``torch``
(pinned tensors and non-blocking copies on dedicated streams). ``VMEM_BACKEND`` (or the
session's ``backend=``) picks one; ``auto`` takes the best that works here, and says once,
as a warning, why a better one does not.

Example::

    >>> from vmem import transfer
    >>> transfer.backends()[-1]
    'torch'
"""

from __future__ import annotations

import logging

import torch

from .base import TransferBackend
from .torch_backend import TorchBackend

__all__ = ["TransferBackend", "TorchBackend", "backends", "make_backend"]

log = logging.getLogger("vmem")
_ORDER = ("native", "cupy", "torch")
_warned: set[str] = set()


def _native(device: torch.device) -> TransferBackend:
    from .native_backend import NativeBackend

    return NativeBackend(device)


def _cupy(device: torch.device) -> TransferBackend:
    from .cupy_backend import CupyBackend

    return CupyBackend(device)


_MAKERS = {"native": _native, "cupy": _cupy, "torch": TorchBackend}


def _unavailable(name: str) -> str | None:
    """Why backend ``name`` cannot load in this installation; None when it can."""
    if name == "native":
        from . import native

        try:
            native.load()
        except native.NativeError as error:
            return str(error)
    elif name == "cupy":
        try:
            import cupy  # noqa: F401
        except ImportError as error:
            return f"cupy is not installed ({error}; pip install cupy-cuda13x)"
    return None


def backends() -> list[str]:
    """The backends that load in this installation, best first (the native library is built
    on the first call where ``nvcc`` is found)."""
    return [name for name in _ORDER if _unavailable(name) is None]


def make_backend(name: str, device: torch.device) -> TransferBackend:
    """The backend ``name`` for ``device``, or for ``"auto"`` the best that works there."""
    if name != "auto":
        if name not in _MAKERS:
            raise ValueError(f"unknown transfer backend {name!r}; set VMEM_BACKEND to one of "
                             f"auto, {', '.join(_ORDER)}")
        reason = _unavailable(name)
        if reason is not None:
            raise RuntimeError(f"transfer backend {name!r} is not available here: {reason}; "
                               "set VMEM_BACKEND=auto or torch")
        return _MAKERS[name](device)
    reasons = []
    for candidate in _ORDER[:-1]:
        if candidate == "cupy" and device.type != "cuda":
            continue  # cupy adds nothing on the emulated device
        try:
            reason = _unavailable(candidate)
            if reason is None:
                backend = _MAKERS[candidate](device)
                break
        except Exception as error:  # noqa: BLE001 -- any failure falls back, once told
            reason = str(error)
        reasons.append(f"{candidate}: {reason}")
    else:
        backend = TorchBackend(device)
    if reasons and not _warned:
        _warned.add(backend.name)
        log.warning("vmem: using the %s transfer backend; %s (set VMEM_BACKEND=%s to choose "
                    "it explicitly)", backend.name, "; ".join(reasons), backend.name)
    return backend
