"""Which save is it: the key that matches a saved tensor of a real step to the plan's.

Example::

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    >>> scope = ModuleScope(model)
    >>> keys = []
    >>> def pack(t):
    ...     keys.append(scope.key_of(t))
    ...     return t
    >>> with scope.step(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    ...     _ = model(torch.randn(2, 4))
    >>> [(k.module, k.call, k.ordinal) for k in keys][-1]  # tanh saves its output
    ('1', 0, 0)
    >>> scope.remove()
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import NamedTuple

import torch
from torch import nn

__all__ = ["ModuleScope", "SaveKey"]


class SaveKey(NamedTuple):
    """A saved storage of one training step, by where it was first saved.

    See [Note: Which save is it].
    """

    module: str  # qualified name of the innermost module running ("" for the model itself)
    call: int  # that module's call in this step: 0 for its first, 1 for its second, ...
    ordinal: int  # how many saves autograd made in that call before this one
    nbytes: int  # the storage's bytes
    dtype: str  # of the tensor first saved from it, e.g. "float32"

    def __str__(self) -> str:
        name = self.module or "<model>"
        return (f"{name}{f'#{self.call}' if self.call else ''} save {self.ordinal} "
                f"({self.nbytes} bytes, {self.dtype})")

    @classmethod
    def of(cls, value) -> SaveKey | None:
        """From its JSON form (a list), or None."""
        return None if value is None else cls(*value)


# Note: [Which save is it]
# A plan says what to do with each tracked save of a step, and the step must find its
# decision again however the step differs from the one planned (more forwards, another
# loss, autocast). So a save is named by *where* it happens, not by a global count: the
# innermost module whose forward is running (saves between two child modules belong to the
# parent running them), which call of that module this is in the step, and the number of
# saves autograd made during that call before this one (every save counts, whatever its
# size or device, so the ordinal does not depend on what is tracked), with the storage's
# bytes and dtype. The profile and the executor compute it with this class on the same
# module objects, so a step that runs as planned matches decision for decision, and a save
# the plan does not know (a second forward's, a dtype changed by autocast) is told apart
# instead of shifting every decision after it. The executor's safety net decides those.


class ModuleScope:
    """Tracks which call of which submodule of ``model`` is running, through module hooks.

    ``prepend``: its hooks run before those already registered (a profile's scope must
    open a module's call before the hooks of the recomputed blocks installed, which save
    the block's input, as the session's scope, registered first, does). The model's own
    call is opened and closed by the owner (:meth:`step` or
    :meth:`open_model` / :meth:`close_model`); outside it the hooks do nothing, so a call of
    a submodule from elsewhere (a profile of the model, a recomputation in backward) never
    disturbs the count. :meth:`new_step` starts counting calls from zero again.
    """

    def __init__(self, model: nn.Module, prepend: bool = False) -> None:
        self._calls: Counter[str] = Counter()
        self._stack: list[list] = []  # [name, call, saves so far] of the modules running
        self._handles = []
        for name, module in model.named_modules():
            if module is model or getattr(module, "vmem_internal", False):
                continue  # vmem's own modules come and go: their saves are their parent's
            self._handles.append(module.register_forward_pre_hook(self._enter_hook(name),
                                                                  prepend=prepend))
            self._handles.append(module.register_forward_hook(self._leave, always_call=True,
                                                              prepend=prepend))

    def _enter_hook(self, name: str):
        def enter(module, args) -> None:
            if self._stack:
                self._open(name)
        return enter

    def _open(self, name: str) -> None:
        call = self._calls[name]
        self._calls[name] = call + 1
        self._stack.append([name, call, 0])

    def _leave(self, module, args, output) -> None:
        if len(self._stack) > 1:
            self._stack.pop()

    def open_model(self) -> None:
        """The model's forward begins: count the calls and saves inside it."""
        self._stack = []
        self._open("")

    def close_model(self) -> None:
        self._stack = []

    def new_step(self) -> None:
        self._calls.clear()

    @contextlib.contextmanager
    def step(self):
        """One step of one forward: new counts, the model's call open inside."""
        self.new_step()
        self.open_model()
        try:
            yield self
        finally:
            self.close_model()

    @property
    def running(self) -> bool:
        return bool(self._stack)

    def count_save(self) -> int:
        """Count a save in the innermost call; the number of saves before it there."""
        frame = self._stack[-1]
        ordinal = frame[2]
        frame[2] = ordinal + 1
        return ordinal

    def key(self, ordinal: int, storage_bytes: int, dtype: torch.dtype) -> SaveKey:
        """The key of a save counted by :meth:`count_save` as ``ordinal``."""
        name, call, _ = self._stack[-1]
        return SaveKey(name, call, ordinal, storage_bytes, str(dtype).removeprefix("torch."))

    def key_of(self, t: torch.Tensor) -> SaveKey | None:
        """Count the save of ``t`` and return its key (None outside the model's call)."""
        if not self._stack:
            return None
        return self.key(self.count_save(), t.untyped_storage().nbytes(), t.dtype)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
