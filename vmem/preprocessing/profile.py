"""The network profile: a model's layers in execution order, with what each costs.

The profiler runs one training step (forward, then backward of ``output.sum()``) under three
instruments at once and joins what they see per layer:

- module hooks mark where each leaf module starts and ends; an aten operator that runs outside
  every leaf module (ResNet's residual add, a ``torch.flatten``) is a layer of its own, so no
  ``nn.Sequential`` structure is assumed;
- ``saved_tensors_hooks`` see every tensor autograd saves for backward; a storage is counted
  once, by the first layer that saves it, and parameters and buffers are excluded;
- a dispatch mode counts FLOPs (:mod:`.flops`), reads the device-memory meter after every
  operator, and in backward attributes each operator to its layer through the autograd node
  running it (autograd sequence numbers grow in forward order).

On the ``meta`` device nothing is allocated, so a ResNet-152 at batch 1024 profiles on a
laptop; the meter's count there is the predicted peak of plain training. On a real device the
step is also timed per layer (CUDA events, or the host clock on the CPU) over a few
iterations. The user's model is never modified: the step runs with stand-ins (fake or
copied tensors) in place of its parameters and buffers, as ``torch.func.functional_call``
does, through backward too.

Example::

    >>> from vmem import models
    >>> from vmem.preprocessing import profile_network
    >>> prof = profile_network(models.resnet18(), (8, 3, 224, 224))  # on "meta"
    >>> prof.layers[0].name, prof.layers[0].kind
    ('conv1', 'Conv2d')
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import json
import statistics
import time
import weakref
from collections import Counter
from collections.abc import Sequence

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import flop_registry

from ..errors import format_bytes
from ..meter import DeviceMeter, EmulatedMeter
from .flops import count_flops
from .keys import ModuleScope, SaveKey

__all__ = ["LayerProfile", "MemoryTimeline", "ModuleCall", "NetworkProfile", "SavedStorage",
           "profile_network"]

# What a convolution is, by behaviour: a module of torch's convolution classes (subclasses
# too), a module that says it convolves (vmem.feedforward.split_runs.SplitRun), or the aten
# operator a convolution runs as between modules (a subclass with a child module is no leaf).
_CONVOLUTION_OPS = frozenset({"convolution", "_convolution", "conv2d", "conv3d", "conv1d"})
_NOT_IN_FORWARD = 2**64 - 1  # sequence number of AccumulateGrad and other graph leaves
_NEVER = 2**62  # an operator index after every operator


@dataclasses.dataclass
class LayerProfile:
    """One layer of the execution order: a leaf module call or a functional operator."""

    index: int
    name: str  # module path ("layer1.0.conv1"), "#k" for its k-th extra call; or path.op
    kind: str  # module class ("Conv2d") or aten operator ("add_")
    module: bool  # a leaf module call (True) or an operator between modules (False)
    input_shapes: list[list[int]]
    input_dtypes: list[str]
    output_shapes: list[list[int]] = dataclasses.field(default_factory=list)
    output_dtypes: list[str] = dataclasses.field(default_factory=list)
    saved_bytes: int = 0  # bytes autograd saved here for backward (new storages only)
    saved_tensors: int = 0  # how many storages those bytes are in
    param_bytes: int = 0  # parameters of the module (first call only)
    forward_flops: int = 0
    backward_flops: int = 0
    live_bytes: int = 0  # device bytes in use when the layer's forward starts
    forward_peak: int = 0  # peak device bytes during its forward
    backward_peak: int = 0  # peak device bytes during its backward
    forward_ms: float | None = None  # measured on a real device, else None
    backward_ms: float | None = None
    conv: bool = False  # a convolution (module or aten operator): it starts a segment


@dataclasses.dataclass
class SavedStorage:
    """One storage autograd saved for backward (parameters and buffers excluded).

    Times are operator indices of the plain step's timeline: a storage "is there" during
    operator ``t`` when ``start <= t < end`` of an interval.
    """

    nbytes: int
    layers: list[int]  # the layers that saved it, in forward order
    saved_at: int  # operator during which it was first saved
    released_at: int  # first operator without it once its saves leave the device
    needed_at: int  # first operator after its first unpack in backward
    freed_at: int  # first operator without it in plain training (after its last use)
    elem_size: int = 0  # bytes per element of the tensor first saved from it
    density: float | None = None  # fraction of non-zero elements, where measured
    key: SaveKey | None = None  # where it was first saved (see [Note: Which save is it])

    def __post_init__(self) -> None:
        if self.key is not None and not isinstance(self.key, SaveKey):
            self.key = SaveKey.of(self.key)


@dataclasses.dataclass
class ModuleCall:
    """One call of a submodule in the profiled forward: the layers it ran and its inputs.

    What the planner recomputes a block from: the saves made in ``[start, stop)`` by its
    layers alone are the block's own, those in ``inputs`` stay (the recomputation's
    input)."""

    name: str  # the module's qualified name
    call: int  # 0 for its first call in the step, 1 for its second, ...
    start: int  # index of its first layer
    stop: int  # one past its last layer
    inputs: list[int] = dataclasses.field(default_factory=list)  # timeline.saves indices
    # of the storages passed to it
    chain: bool = False  # an nn.Sequential running nn.Sequential.forward (its children
    # a chain: stretches of them can be recomputed)
    inplace: bool = False  # a module that writes into its input (``inplace=True``): it
    # cannot be recomputed from that input


@dataclasses.dataclass
class MemoryTimeline:
    """Device memory of one plain training step, operator by operator, and its saves."""

    memory: list[int]  # peak device bytes during each operator
    layer: list[int]  # the layer each operator belongs to (-1: none, e.g. the loss)
    backward_from: int  # index of the first backward operator
    saves: list[SavedStorage]  # in the order of their first save
    # What each operator costs, for the simulator's roofline:
    flops: list[int] = dataclasses.field(default_factory=list)  # (:mod:`.flops`)
    moved: list[int] = dataclasses.field(default_factory=list)  # bytes of its tensor
    # arguments and results (what it reads and writes in device memory; views: none)
    dense: list[str] = dataclasses.field(default_factory=list)  # the rate it computes at:
    # "tf32" (an fp32 convolution, TF32 by cuDNN's default), "fp32" (an fp32 matrix
    # product), "half" (bf16/fp16 convolution or product), "" (not a matrix operator)

    def __post_init__(self) -> None:
        self.saves = [s if isinstance(s, SavedStorage) else SavedStorage(**s)
                      for s in self.saves]


@dataclasses.dataclass
class NetworkProfile:
    """A model's layers in execution order and the totals of one plain training step."""

    model: str
    input_shape: list[int]
    dtype: str
    device: str
    layers: list[LayerProfile]
    param_bytes: int  # parameters (gradients take as much again)
    buffer_bytes: int  # BatchNorm running statistics and the like
    input_bytes: int
    peak_bytes: int  # device peak of one plain forward+backward: the predicted plain peak
    timeline: MemoryTimeline  # shape-only (meta) memory of that step, for the planner
    foreign: list[str] = dataclasses.field(default_factory=list)  # modules whose forward ran
    # under saved-tensor hooks not the profile's (inside the model's own checkpoint)
    gradients_held: bool = False  # its step started with the gradients on the device (and
    # its memory counts them throughout)
    calls: list[ModuleCall] = dataclasses.field(default_factory=list)  # submodule calls,
    # in the order they started

    def __post_init__(self) -> None:
        if isinstance(self.timeline, dict):
            self.timeline = MemoryTimeline(**self.timeline)
        self.calls = [c if isinstance(c, ModuleCall) else ModuleCall(**c) for c in self.calls]

    @property
    def saved_bytes(self) -> int:
        return sum(layer.saved_bytes for layer in self.layers)

    @property
    def forward_flops(self) -> int:
        return sum(layer.forward_flops for layer in self.layers)

    @property
    def backward_flops(self) -> int:
        return sum(layer.backward_flops for layer in self.layers)

    @property
    def timed(self) -> bool:
        return any(layer.forward_ms is not None for layer in self.layers)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["totals"] = {"saved_bytes": self.saved_bytes, "forward_flops": self.forward_flops,
                          "backward_flops": self.backward_flops}
        return data

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> NetworkProfile:
        data = json.loads(text)
        data.pop("totals", None)
        data["layers"] = [LayerProfile(**layer) for layer in data["layers"]]
        return cls(**data)

    def table(self) -> str:
        """A per-layer table and the totals, for people."""
        head = (f"{'#':>4}  {'layer':<28} {'kind':<18} {'output':<20} {'saved':>11} "
                f"{'params':>11} {'fwd GF':>8} {'bwd GF':>8}")
        if self.timed:
            head += f" {'fwd ms':>8} {'bwd ms':>8}"
        rows = [head, "-" * len(head)]
        for layer in self.layers:
            shape = "x".join(map(str, layer.output_shapes[0])) if layer.output_shapes else "-"
            row = (f"{layer.index:>4}  {layer.name[-28:]:<28} {layer.kind[:18]:<18} "
                   f"{shape[:20]:<20} {format_bytes(layer.saved_bytes):>11} "
                   f"{format_bytes(layer.param_bytes):>11} {layer.forward_flops / 1e9:>8.2f} "
                   f"{layer.backward_flops / 1e9:>8.2f}")
            if self.timed:
                row += f" {layer.forward_ms or 0:>8.3f} {layer.backward_ms or 0:>8.3f}"
            rows.append(row)
        shape = "x".join(map(str, self.input_shape))
        rows += [
            "",
            f"model {self.model}, input {shape} {self.dtype}, profiled on {self.device}",
            f"layers                      {len(self.layers)}",
            f"parameters                  {format_bytes(self.param_bytes)} "
            f"(+ as much again for gradients)",
            f"buffers                     {format_bytes(self.buffer_bytes)}",
            f"saved activations           {format_bytes(self.saved_bytes)}",
            f"forward / backward          {self.forward_flops / 1e12:.3f} / "
            f"{self.backward_flops / 1e12:.3f} TFLOP",
            f"predicted plain peak        {format_bytes(self.peak_bytes)} ({self.peak_bytes} "
            "bytes; forward+backward, no optimizer state)",
        ]
        if self.timed:
            fwd = sum(layer.forward_ms or 0 for layer in self.layers)
            bwd = sum(layer.backward_ms or 0 for layer in self.layers)
            rows.append(f"measured forward / backward {fwd:.2f} / {bwd:.2f} ms")
        return "\n".join(rows)


def _describe(tree) -> tuple[list[list[int]], list[str]]:
    tensors = [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]
    return [list(t.shape) for t in tensors], [str(t.dtype).removeprefix("torch.") for t in tensors]


def _moved(func, args, kwargs, out) -> int:
    """Bytes an operator reads and writes: its tensor arguments' and results' (none for a
    view or a metadata query)."""
    if func.is_view or func.namespace == "prim":
        return 0
    return sum(t.numel() * t.element_size() for t in tree_flatten((args, kwargs, out))[0]
               if isinstance(t, torch.Tensor))


_HALF = (torch.float16, torch.bfloat16)


def _dense(func, args) -> str:
    """The rate a matrix operator runs at (see ``MemoryTimeline.dense``); "" for others."""
    if func._overloadpacket not in flop_registry:
        return ""
    first = next((t for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor)), None)
    if first is not None and first.dtype in _HALF:
        return "half"
    name = func._overloadpacket.__name__
    return "tf32" if "conv" in name else "fp32"


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class _Clock:
    """Timestamps on the device's timeline: CUDA events, or the host clock elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed_ms(self, start, end) -> float:
        if not self.cuda:
            return (end - start) * 1e3
        return start.elapsed_time(end)

    def passed(self, mark) -> bool:
        """Whether the device has reached ``mark``; never waits."""
        return not self.cuda or mark.query()


class _Recorder(TorchDispatchMode):
    """Joins module hooks, saved-tensor hooks and the dispatch stream into layers."""

    def __init__(self, meter: DeviceMeter, clock: _Clock | None, resident: set[int]) -> None:
        super().__init__()
        self.meter, self.clock, self.resident = meter, clock, resident
        self.layers: list[LayerProfile] = []
        self.seq_starts: list[int] = []  # first autograd sequence number of each layer
        self.seq_end = _NOT_IN_FORWARD
        self.param_layer: dict[int, int] = {}  # parameter storage -> first layer using it
        self.saves: dict[int, SavedStorage] = {}  # storage -> its record (alive ones only)
        self.save_order: list[SavedStorage] = []
        self.pending: list[int] = []  # storages of saves not yet attributed (see the note)
        self.last_outputs: set[int] = set()  # storages the last functional operator made
        self.calls: Counter[str] = Counter()
        self.scope = [""]  # qualified names of the modules running
        self.in_leaf = False
        self.backward = False
        self.backward_from = 0
        self.open: int | None = None  # the layer whose forward or backward is running
        self.opened_at = None
        self.memory: list[int] = []  # peak device bytes during each operator
        self.op_layer: list[int] = []
        self.op_flops: list[int] = []
        self.op_moved: list[int] = []
        self.op_dense: list[str] = []
        self.spans: list[tuple] = []  # (layer, in backward, start mark, end mark)
        self.calls_running: ModuleScope | None = None  # which module call saves, while hooked
        self.foreign: set[str] = set()  # modules run under other saved-tensor hooks
        self.module_calls: list[ModuleCall] = []
        self.open_calls: list[ModuleCall] = []
        self.call_counts: Counter[str] = Counter()
        self.wanted: dict[int, list[ModuleCall]] = {}  # input storage not yet saved -> calls
        self.save_index: dict[int, int] = {}  # alive saved storage -> its index in save_order

    @property
    def now(self) -> int:
        return len(self.memory)  # index of the next operator

    # -- layer boundaries -------------------------------------------------------------
    def start_layer(self, name: str, kind: str, module: bool, inputs,
                    conv: bool = False) -> LayerProfile:
        if module:
            self._settle_pending(self.open)
        self.last_outputs = set()
        self.switch_to(len(self.layers))
        self.calls[name] += 1
        if self.calls[name] > 1:
            name = f"{name}#{self.calls[name] - 1}"
        shapes, dtypes = _describe(inputs)
        layer = LayerProfile(len(self.layers), name, kind, module, shapes, dtypes,
                             live_bytes=self.meter.current, conv=conv)
        self.layers.append(layer)
        self.seq_starts.append(torch._C._autograd._get_sequence_nr())
        self._settle_pending(layer.index)  # a functional operator's input saves
        return layer

    def switch_to(self, index: int | None) -> None:
        """Close the open layer's forward or backward time span and open ``index``'s."""
        if index == self.open:
            return
        now = self.clock.mark() if self.clock else None
        if self.open is not None and self.clock:
            self.spans.append((self.open, self.backward, self.opened_at, now))
        self.open, self.opened_at = index, now

    def end_forward(self) -> None:
        self._settle_pending(self.open)
        self.switch_to(None)
        self.seq_end = torch._C._autograd._get_sequence_nr()

    def start_backward(self) -> None:
        self.backward, self.backward_from = True, self.now

    def end_backward(self) -> None:
        self.switch_to(None)

    # -- module hooks -----------------------------------------------------------------
    def hook(self, model: nn.Module) -> list:
        # Prepended: before the hooks of vmem's recomputed blocks, which save their inputs.
        self.calls_running = ModuleScope(model, prepend=True)
        handles = [self.calls_running]
        for name, module in model.named_modules():
            leaf = next(module.children(), None) is None
            pre, post = (self._leaf_pre, self._leaf_post) if leaf else (self._push, self._pop)
            handles.append(module.register_forward_pre_hook(pre(name, module), prepend=True))
            handles.append(module.register_forward_hook(post(name), prepend=True))
        return handles

    # Module hooks act in forward only: in backward a recomputation runs modules again.
    def _open_call(self, name: str, module: nn.Module, args) -> None:
        if not name:
            return  # the model's own call
        call = ModuleCall(name, self.call_counts[name], len(self.layers), len(self.layers),
                          chain=isinstance(module, nn.Sequential) and
                          type(module).forward is nn.Sequential.forward,
                          inplace=getattr(module, "inplace", False) is True)
        self.call_counts[name] += 1
        for t in tree_flatten(args)[0]:
            if isinstance(t, torch.Tensor):
                key = _storage_key(t)
                if key in self.save_index:
                    call.inputs.append(self.save_index[key])
                else:
                    self.wanted.setdefault(key, []).append(call)
        self.module_calls.append(call)
        self.open_calls.append(call)

    def _close_call(self, name: str) -> None:
        if not name or not self.open_calls:
            return
        call = self.open_calls.pop()
        call.stop = len(self.layers)
        for calls in self.wanted.values():
            if call in calls:
                calls.remove(call)

    def _leaf_pre(self, name: str, module: nn.Module):
        def pre(mod, args):
            if self.backward:
                return
            self._open_call(name, mod, args)
            self._note_foreign(name)
            layer = self.start_layer(name, type(mod).__name__, True, args,
                                     conv=isinstance(mod, nn.modules.conv._ConvNd) or
                                     getattr(mod, "convolves", False))
            for p in mod.parameters(recurse=False):
                key = _storage_key(p)
                if key not in self.param_layer:
                    self.param_layer[key] = layer.index
                    layer.param_bytes += p.untyped_storage().nbytes()
            self.in_leaf = True
        return pre

    def _leaf_post(self, name: str):
        def post(mod, args, out) -> None:
            if self.backward:
                return
            self.layers[-1].output_shapes, self.layers[-1].output_dtypes = _describe(out)
            self.in_leaf = False
            self._close_call(name)
        return post

    def _push(self, name: str, module: nn.Module):
        def pre(mod, args):
            if self.backward:
                return
            self.scope.append(name)
            self._open_call(name, mod, args)
            self._note_foreign(name)
        return pre

    def _note_foreign(self, name: str) -> None:
        """Remember a module whose forward runs under saved-tensor hooks not the profile's
        (the model's own ``torch.utils.checkpoint``): it recomputes itself already."""
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
        if top is None or top[0] != self.pack:
            self.foreign.add(name)

    def _pop(self, name: str):
        def post(mod, args, out) -> None:
            if self.backward:
                return
            self.scope.pop()
            self._close_call(name)
        return post

    # -- saved tensors ----------------------------------------------------------------
    # Note: [Whose save is it]
    # Autograd saves an operator's inputs *before* the operator reaches the dispatch mode and
    # its outputs after. Inside a leaf module either way the save is the module's. Between
    # modules, a save of the last operator's output is that operator's; any other save waits
    # ("pending") for the next boundary: a functional operator starting takes it, a leaf
    # module starting or the forward ending gives it to the layer still open.
    def pack(self, t: torch.Tensor) -> torch.Tensor:
        ordinal = self.calls_running.count_save()  # see [Note: Which save is it]
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.resident:
            return t
        if key not in self.saves:
            record = SavedStorage(storage.nbytes(), [], self.now, _NEVER, _NEVER, _NEVER,
                                  t.element_size(),
                                  key=self.calls_running.key(ordinal, storage.nbytes(), t.dtype))
            self.saves[key] = record
            for call in self.wanted.pop(key, ()):
                call.inputs.append(len(self.save_order))
            self.save_index[key] = len(self.save_order)
            self.save_order.append(record)
            weakref.finalize(storage, self._freed, key)
        if self.in_leaf or key in self.last_outputs:
            self._attribute(self.open, key)
        else:
            self.pending.append(key)
        return t

    def unpack(self, t: torch.Tensor) -> torch.Tensor:
        record = self.saves.get(_storage_key(t))
        if record is not None:
            record.needed_at = min(record.needed_at, self.now)
        return t

    def _freed(self, key: int) -> None:
        self.saves.pop(key).freed_at = self.now
        self.save_index.pop(key, None)

    def _attribute(self, index: int | None, key: int) -> None:
        record = self.saves[key]
        if index is None or index in record.layers:
            return
        if not record.layers:  # its bytes count once, for the first layer saving it
            self.layers[index].saved_bytes += record.nbytes
            self.layers[index].saved_tensors += 1
        record.layers.append(index)

    def _settle_pending(self, index: int | None) -> None:
        for key in self.pending:
            self._attribute(index, key)
        self.pending.clear()

    # -- every operator ---------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.backward:
            self.switch_to(self._layer_of_backward_op())
        elif not self.in_leaf and self.seq_end == _NOT_IN_FORWARD and \
                func.namespace != "prim":  # fake tensors' metadata queries compute nothing
            scope, op = self.scope[-1], func._overloadpacket.__name__
            self.start_layer(f"{scope}.{op}" if scope else op, op, False, (args, kwargs),
                             conv=op in _CONVOLUTION_OPS)
        self.meter.reset_peak()
        out = func(*args, **kwargs)
        self.memory.append(self.meter.peak)
        self.op_layer.append(-1 if self.open is None else self.open)
        flops = count_flops(func, args, kwargs, out)
        self.op_flops.append(flops)
        self.op_moved.append(_moved(func, args, kwargs, out))
        self.op_dense.append(_dense(func, args))
        if self.open is None:
            return out
        layer = self.layers[self.open]
        if self.backward:
            layer.backward_flops += flops
            layer.backward_peak = max(layer.backward_peak, self.memory[-1])
        else:
            layer.forward_flops += flops
            layer.forward_peak = max(layer.forward_peak, self.memory[-1])
            if not self.in_leaf:
                layer.output_shapes, layer.output_dtypes = _describe(out)
                self.last_outputs = {_storage_key(t) for t in tree_flatten(out)[0]
                                     if isinstance(t, torch.Tensor)}
        return out

    def _layer_of_backward_op(self) -> int | None:
        node = torch._C._current_autograd_node()
        if node is None:
            return None
        seq = node._sequence_nr()
        if seq == _NOT_IN_FORWARD:  # AccumulateGrad: the layer that owns the parameter
            variable = getattr(node, "variable", None)
            return None if variable is None else self.param_layer.get(_storage_key(variable))
        if seq >= self.seq_end:  # the loss's, or a layer's own autograd inside its backward
            return self.open
        return bisect.bisect_right(self.seq_starts, seq) - 1

    def times(self) -> tuple[dict[int, float], dict[int, float]]:
        """Forward and backward milliseconds per layer, once the device has finished."""
        if self.clock and self.clock.cuda:
            torch.cuda.synchronize()
        forward: dict[int, float] = {}
        backward: dict[int, float] = {}
        for index, in_backward, start, end in self.spans:
            times = backward if in_backward else forward
            times[index] = times.get(index, 0.0) + self.clock.elapsed_ms(start, end)
        return forward, backward

    def timeline(self) -> MemoryTimeline:
        return MemoryTimeline(self.memory, self.op_layer, self.backward_from, self.save_order,
                              self.op_flops, self.op_moved, self.op_dense)


class _Releaser(TorchDispatchMode):
    """A second shape-only step whose saves leave the device: when does each storage go?

    Every save is packed as its shape alone, so a storage is freed as soon as the forward
    code drops it; the operator index of that moment is the storage's ``released_at``, the
    start of the interval an offload saves. Saves are recognised by the order of first save,
    which is the plain step's order.
    """

    def __init__(self, resident: set[int], saves: list[SavedStorage],
                 device: torch.device) -> None:
        super().__init__()
        self.resident, self.saves, self.device = resident, saves, device
        self.seen: dict[int, int] = {}  # alive storage -> index into saves
        self.count = 0  # distinct storages saved so far
        self.ops = 0
        self.forward_done = False

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.resident:
            return t
        if key not in self.seen:
            self.seen[key] = self.count
            weakref.finalize(storage, self._released, key, self.count)
            self.count += 1
        return (storage.nbytes(), t.dtype, t.storage_offset(), t.shape, t.stride())

    def _released(self, key: int, index: int) -> None:
        self.seen.pop(key, None)
        if index < len(self.saves) and not self.forward_done:
            self.saves[index].released_at = self.ops

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        nbytes, dtype, offset, shape, stride = packed
        storage = torch.empty(nbytes, dtype=torch.uint8, device=self.device).untyped_storage()
        return torch.empty(0, dtype=dtype, device=self.device).set_(storage, offset, shape,
                                                                   stride)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))

    calls_running = None  # saves are told apart by their order here

    def hook(self, model: nn.Module) -> list:
        return []

    def end_forward(self) -> None:
        self.forward_done = True  # later releases are backward's own, in plain training too

    def start_backward(self) -> None:
        pass

    def end_backward(self) -> None:
        pass


def _step(model: nn.Module, tensors: dict[str, torch.Tensor], inputs: tuple, recorder,
          meter: DeviceMeter | None = None, forwards: int = 1,
          gradients_held: bool = False) -> None:
    """One plain training step (``forwards`` forwards, backward of the outputs' sum) under
    ``recorder``; with ``gradients_held``, into gradients that exist before it starts.

    The outputs stay alive through backward, as a training loop's ``out`` does."""
    args, kwargs = inputs
    held = []  # the gradients backward accumulates into, as in an accumulation loop
    if gradients_held:
        for t in tensors.values():
            if t.requires_grad:
                t.grad = torch.zeros_like(t)
                held.append(t.grad)
    handles = recorder.hook(model)
    calls = recorder.calls_running
    try:
        # The stand-ins replace the model's tensors over the whole step, backward included:
        # a checkpoint inside the model runs its forward again there (torch.func's
        # functional_call would have put the model's own tensors back by then).
        with meter or contextlib.nullcontext(), recorder, \
                _reparametrize_module(model, tensors, tie_weights=True):
            if calls:
                calls.new_step()
            if isinstance(meter, EmulatedMeter):
                meter.track(held)  # in use as the step starts
            out = []
            for _ in range(forwards):
                # Hooks around forward only, as the session's: unpack stays with each save,
                # and a layer recomputing inside its backward (a split run) saves without.
                if calls:
                    calls.open_model()
                with torch.autograd.graph.saved_tensors_hooks(recorder.pack, recorder.unpack):
                    out.append(model(*args, **kwargs))
                if calls:
                    calls.close_model()
            recorder.end_forward()
            # The loop leaves autocast before backward, and its casts cache goes with it
            # (the casts its saves hold stay alive through them).
            torch.clear_autocast_cache()
            grads = [t for t in tree_flatten(out)[0]
                     if isinstance(t, torch.Tensor) and t.requires_grad]
            recorder.start_backward()
            if grads:  # a frozen model run with gradients on has no backward
                with _no_autocast(grads[0].device):  # a loop's backward runs outside it
                    sum(t.float().sum() for t in grads).backward()
            recorder.end_backward()
            del grads, out
    finally:
        for handle in handles:
            handle.remove()


def _no_autocast(device: torch.device):
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def profile_network(model: nn.Module, input_shape: Sequence[int] | None = None, *,
                    inputs: tuple = (), kwargs: dict | None = None,
                    device: torch.device | str = "meta", dtype: torch.dtype | None = None,
                    iterations: int = 3, name: str | None = None,
                    forwards: int = 1, gradients_held: bool = False) -> NetworkProfile:
    """Profile one plain training step of ``model``.

    Args:
        model: any ``nn.Module``; it is not modified.
        input_shape: the shape of the model's one input, e.g. ``(256, 3, 224, 224)``;
            or, instead, ``inputs`` and ``kwargs``:
        inputs, kwargs: example positional and keyword arguments; each tensor among them is
            replaced by a stand-in of its shape and dtype (random floats, or zeros for
            integer inputs such as token ids), anything else passed as it is.
        device: ``"meta"`` (the default) for a shape-only profile that allocates nothing;
            a real device (``"cuda"``, ``"cpu"``) also measures per-layer times.
        dtype: the parameters' (and a shaped input's) floating-point type; by default the
            first floating-point input's, else float32.
        iterations: timed steps on a real device, after one warm-up step; per-layer times are
            the median.
        name: what the profile calls the model (the class name by default).
        forwards: forwards of the same inputs before the one backward (a loop that sums
            the losses of two views of a batch runs two).
        gradients_held: the parameters' gradients exist as the step starts (gradient
            accumulation, ``zero_grad(set_to_none=False)``): the shape-only step
            accumulates into them, and its memory counts them throughout.

    Example::

        >>> from vmem import models
        >>> prof = profile_network(models.vgg16(), (64, 3, 224, 224))
        >>> prof.peak_bytes > prof.param_bytes * 2
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if input_shape is not None:
        if len(input_shape) < 1 or any(int(s) < 1 for s in input_shape):
            raise ValueError(f"input_shape={tuple(input_shape)} must be positive sizes, "
                             "e.g. (32, 3, 224, 224)")
        inputs = (torch.empty(tuple(int(n) for n in input_shape), device="meta",
                              dtype=dtype or torch.float32),)
    example = (tuple(inputs), dict(kwargs or {}))
    tensors_in = [t for t in tree_flatten(example)[0] if isinstance(t, torch.Tensor)]
    if not tensors_in:
        raise ValueError("profile_network needs an input: pass input_shape or tensors in "
                         "inputs/kwargs")
    if dtype is None:
        dtype = next((t.dtype for t in tensors_in if t.is_floating_point()), torch.float32)
    device = torch.device(device)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    shape_device = _shape_device(model, tensors_in)
    with _shape_only(shape_device):
        recorder, _ = _run(model, params, buffers, example, shape_device, dtype, timed=False,
                           shape_only=True, forwards=forwards, gradients_held=gradients_held)
        tensors = _device_copies(params, buffers, shape_device, dtype, shape_only=True)
        stand_ins = _stand_ins(example, shape_device, shape_only=True)
        _step(model, tensors, stand_ins, _Releaser(_keys(list(tensors.values()), stand_ins),
                                                   recorder.save_order, shape_device),
              forwards=forwards, gradients_held=gradients_held)
    layers, peak = recorder.layers, max(recorder.memory, default=0)
    if device.type != "meta":
        steps = [_run(model, params, buffers, example, device, dtype, timed=True)
                 for _ in range(1 + max(1, iterations))]
        layers = steps[-1][0].layers  # what the device saved and allocated
        forward_ms = [fwd for _, (fwd, _) in steps[1:]]  # the first step warmed up
        backward_ms = [bwd for _, (_, bwd) in steps[1:]]
        for layer in layers:
            layer.forward_ms = statistics.median(t.get(layer.index, 0.0) for t in forward_ms)
            layer.backward_ms = statistics.median(t.get(layer.index, 0.0) for t in backward_ms)
    return NetworkProfile(
        model=name or type(model).__name__,
        input_shape=list(tensors_in[0].shape),
        dtype=str(dtype).removeprefix("torch."),
        device=str(device),
        layers=layers,
        param_bytes=sum(_nbytes(p, dtype) for p in params.values()),
        buffer_bytes=sum(_nbytes(b, dtype) for b in buffers.values()),
        input_bytes=sum(t.numel() * t.element_size() for t in tensors_in),
        peak_bytes=peak,
        timeline=recorder.timeline(),
        foreign=sorted(recorder.foreign),
        gradients_held=gradients_held,
        calls=recorder.module_calls,
    )


def _shape_device(model: nn.Module, inputs: list[torch.Tensor]) -> torch.device:
    """The device a shape-only profile's tensors report: the model's (or its input's), so
    that autocast, dtype promotion and device-specific kernels apply as in the real step."""
    for t in [*model.parameters(), *model.buffers(), *inputs]:
        return t.device
    return torch.device("meta")


def _shape_only(device: torch.device):
    """Where tensors made on ``device`` hold no memory: fake tensors reporting ``device``
    (torch.compile's own), or the ``meta`` device itself."""
    if device.type == "meta":
        return contextlib.nullcontext()
    return FakeTensorMode(allow_non_fake_inputs=True)


def _stand_ins(example: tuple, device: torch.device, shape_only: bool = False) -> tuple:
    """The example inputs with each tensor replaced by a fresh one on ``device``."""
    def stand_in(value):
        if not isinstance(value, torch.Tensor):
            return value
        if shape_only:
            return torch.empty(value.shape, dtype=value.dtype, device=device)
        if value.is_floating_point():
            return torch.randn(value.shape, dtype=value.dtype, device=device)
        return torch.zeros(value.shape, dtype=value.dtype, device=device)
    return tree_map(stand_in, example)


def _keys(*groups) -> set[int]:
    """Storages of the tensors in ``groups``: parameters, buffers and inputs stay resident."""
    return {_storage_key(t) for t in tree_flatten(groups)[0] if isinstance(t, torch.Tensor)}


def _run(model: nn.Module, params: dict, buffers: dict, example: tuple, device: torch.device,
         dtype: torch.dtype, timed: bool, shape_only: bool = False, forwards: int = 1,
         gradients_held: bool = False):
    """One recorded step on ``device`` (shape-only: under :func:`_shape_only`); returns the
    recorder and, if timed, the times."""
    tensors = _device_copies(params, buffers, device, dtype, shape_only)
    stand_ins = _stand_ins(example, device, shape_only)
    meter = EmulatedMeter(device, fake=True) if shape_only else DeviceMeter.for_device(device)
    resident = _keys(list(tensors.values()), stand_ins)
    if isinstance(meter, EmulatedMeter):
        meter.track([*tensors.values(), *(t for t in tree_flatten(stand_ins)[0]
                                          if isinstance(t, torch.Tensor))])
    recorder = _Recorder(meter, _Clock(device) if timed else None, resident)
    _step(model, tensors, stand_ins, recorder, meter, forwards, gradients_held)
    return recorder, recorder.times() if timed else None


def _nbytes(t: torch.Tensor, dtype: torch.dtype) -> int:
    size = torch.empty(0, dtype=dtype).element_size() if t.is_floating_point() else t.element_size()
    return t.numel() * size


def _device_copies(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                   device: torch.device, dtype: torch.dtype,
                   shape_only: bool = False) -> dict[str, torch.Tensor]:
    """Stand-ins for the model's tensors on ``device``; the model's own are left alone."""
    def copy(t: torch.Tensor) -> torch.Tensor:
        kind = dtype if t.is_floating_point() else t.dtype
        return torch.empty(t.shape, dtype=kind, device=device) if shape_only else \
            t.detach().to(device=device, dtype=kind, copy=True)
    tensors = {k: copy(p).requires_grad_(p.requires_grad) for k, p in params.items()}
    tensors.update({k: copy(b) for k, b in buffers.items()})
    return tensors
