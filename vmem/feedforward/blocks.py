"""Recomputed blocks: any submodule, or stretch of a plain ``nn.Sequential``, run again in
backward instead of keeping what it saves.

A *unit* is named as the plan names it: a module by its qualified name (``layer1.0``, a
residual block; ``features.3``, a dense layer), or a stretch of children of an
``nn.Sequential`` whose class keeps ``nn.Sequential.forward`` by ``container[start:stop]``
(``features[0:3]``; ``[0:3]`` for the model itself). :class:`Recomputation` puts each in
PyTorch's own non-reentrant checkpoint through module hooks, as
``torch.distributed._composable.checkpoint`` does: a forward pre-hook opens
``torch.utils.checkpoint``'s checkpoint region with the call's arguments, the forward hook
closes it. Nothing of the user's model is replaced or wrapped: no parameter, buffer,
``state_dict`` key, module or ``forward`` changes, and removing the hooks leaves the model
as it was. From the maintained implementation come: the random-number state replayed
(dropout masks), the forward's autocast state, double backward, and tensor hooks that run
once (the recomputed tensors are swapped into the one graph). vmem adds:

- buffers updated once: the recomputation runs with every buffer of the unit put back
  afterwards as forward left it, so BatchNorm's running statistics count each batch once;
- the unit's input is the one tensor the checkpoint saves, through the saved-tensor hooks
  around it, so the plan may offload it (recompute inside, offload the boundary); the
  arguments are kept as they were at the call (a list the caller appends to later, as
  DenseNet's dense block does, is recomputed from its contents then);
- a stretch runs again only as a chain: each child after the first must receive exactly
  the previous child's output (a forward that iterates its ``nn.Sequential`` and works
  between the children raises instead of recomputing something else).

The recomputation calls the unit's module (or the stretch's children) again, with their own
hooks: a forward hook that changes an output changes it in the recomputation too.

Example::

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten())
    >>> x = torch.randn(2, 3, 8, 8)
    >>> with Recomputation(model, ["[0:3]"]):
    ...     model(x).sum().backward()
    >>> int(model[1].num_batches_tracked)  # once, though forward ran twice
    1
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import _checkpoint_without_reentrant_generator as _region

__all__ = ["Recomputation", "resolve_unit", "stretch_of"]

_STRETCH = re.compile(r"^(.*)\[(\d+):(\d+)\]$")


def stretch_of(name: str) -> tuple[str, int, int] | None:
    """``(container, start, stop)`` of a stretch unit's name, None for a module's."""
    match = _STRETCH.match(name)
    return None if match is None else (match[1], int(match[2]), int(match[3]))


def resolve_unit(model: nn.Module, name: str) -> list[nn.Module]:
    """The modules a unit name stands for in ``model``: the module, or the stretch's
    children in order.

    Raises:
        ValueError: ``model`` has no such unit (or it names the model itself).
    """
    stretch = stretch_of(name)
    try:
        if stretch is None:
            if not name:
                raise ValueError("the model itself")
            return [model.get_submodule(name)]
        container, start, stop = stretch
        sequential = model.get_submodule(container)
        if not isinstance(sequential, nn.Sequential) or \
                type(sequential).forward is not nn.Sequential.forward:
            raise ValueError(f"{container or 'the model'} is not a plain nn.Sequential")
        children = list(sequential)
        if not 0 <= start < stop <= len(children):
            raise ValueError(f"it has {len(children)} children")
        return children[start:stop]
    except (AttributeError, ValueError) as error:
        raise ValueError(
            f"the plan recomputes {name!r}, which is not a block of this "
            f"{type(model).__name__} ({error}); install a plan made for this model") from None


# The region's parameters before its *args, whatever this torch's signature adds.
_HEAD = [p for p in inspect.signature(_region).parameters.values()
         if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]


def _open_region(fn, context_fn, args, kwargs):
    """``torch.utils.checkpoint``'s non-reentrant region over a call of ``fn``, opened
    (its generator, advanced to the forward); the arguments bound by name so that the
    positional ones after them reach ``args``."""
    values = {"fn": fn, "preserve_rng_state": True, "context_fn": context_fn}
    head = [values.get(p.name, p.default) for p in _HEAD]
    region = _region(*head, *args, **kwargs)
    next(region)
    return region


class _Unit:
    """One recomputed unit's hooks and the regions of its calls running."""

    def __init__(self, owner: Recomputation, name: str, modules: list[nn.Module]) -> None:
        self.owner, self.name, self.modules = owner, name, modules
        self.regions: list = []  # one per call running (a unit may be called within a call
        # of another unit only if the plan nests them, which it does not; kept general)
        self.outputs: list = []  # a stretch's last child's output, checked by the next
        first, last = modules[0], modules[-1]
        self.handles = [first.register_forward_pre_hook(self._enter, with_kwargs=True),
                        last.register_forward_hook(self._leave, always_call=True)]
        if len(modules) > 1:
            self.handles += [m.register_forward_pre_hook(self._chained(i))
                             for i, m in enumerate(modules) if i]
            self.handles += [m.register_forward_hook(self._passed)
                             for m in modules[:-1]]

    def _live(self) -> bool:
        return not self.owner.replaying and torch.is_grad_enabled()

    def _enter(self, module, args, kwargs) -> None:
        if not self._live():
            return
        # The arguments as they are now: a list the caller appends to later (DenseNet's
        # features) must not change what the recomputation receives.
        leaves, spec = tree_flatten((args, kwargs))
        self.regions.append(_open_region(functools.partial(self._run, spec), self._contexts,
                                         leaves, {}))

    def _leave(self, module, args, output) -> None:
        if not self._live() or not self.regions:
            return
        region = self.regions.pop()
        try:
            next(region)
        except StopIteration:
            pass
        self.outputs.clear()

    def _passed(self, module, args, output) -> None:
        if self._live() and self.regions:
            self.outputs[:] = [output]

    def _chained(self, index: int):
        def check(module, args) -> None:
            if not self._live() or not self.regions:
                return
            if len(args) != 1 or not self.outputs or args[0] is not self.outputs[0]:
                raise RuntimeError(
                    f"vmem: {self.name} is recomputed as a chain of its children, but child "
                    f"{index} did not receive child {index - 1}'s output (the forward works "
                    "between them); plan this model again (vmem does so in a session) or use "
                    "policy='vdnn_conv'")
        return check

    def _run(self, spec, *leaves) -> None:
        """The recomputation: the unit's calls again, on the inputs forward saved."""
        args, kwargs = tree_unflatten(list(leaves), spec)
        x = self.modules[0](*args, **kwargs)
        for module in self.modules[1:]:
            x = module(x)

    def _contexts(self):
        return contextlib.nullcontext(), self.owner.replay(self.modules)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.regions.clear()


class Recomputation:
    """Context manager: the units ``names`` of ``model`` recompute in backward while it is
    entered (see the module docstring); :meth:`activate` / :meth:`deactivate` do the same.

    Raises:
        ValueError: a name is not a unit of ``model`` (:func:`resolve_unit`).
    """

    def __init__(self, model: nn.Module, names) -> None:
        self.model, self.names = model, list(names)
        self.units = {name: resolve_unit(model, name) for name in self.names}
        self._installed: list[_Unit] = []
        self.replaying = 0  # recomputations running (the hooks stand aside meanwhile)

    def activate(self) -> None:
        if not self._installed:
            self._installed = [_Unit(self, name, modules)
                               for name, modules in self.units.items()]

    def deactivate(self) -> None:
        for unit in self._installed:
            unit.remove()
        self._installed = []

    def __enter__(self) -> Recomputation:
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def replay(self, modules: list[nn.Module]) -> _Replay:
        """The context around each recomputation of ``modules`` (reusable: a double
        backward recomputes again)."""
        return _Replay(self, modules)


class _Replay:
    """Around a recomputation: the hooks stand aside, and every buffer of the modules is
    put back afterwards as forward left it (BatchNorm counts the batch once)."""

    def __init__(self, owner: Recomputation, modules: list[nn.Module]) -> None:
        self.owner, self.modules, self.kept = owner, modules, []

    def __enter__(self) -> None:
        buffers = [b for m in self.modules for b in m.buffers()]
        self.kept.append((buffers, [b.clone() for b in buffers]))
        self.owner.replaying += 1

    def __exit__(self, *exc) -> None:
        self.owner.replaying -= 1
        buffers, values = self.kept.pop()
        with torch.no_grad():
            for buffer, value in zip(buffers, values, strict=True):
                buffer.copy_(value)
