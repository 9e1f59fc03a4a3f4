import pytest
import torch
from torch import nn

from vmem import models
from vmem.meter import DeviceMeter
from vmem.preprocessing import NetworkProfile, profile_network


def _resident_keys(model: nn.Module) -> set[int]:
    return {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}


def _graph_saved_bytes(root: torch.Tensor, resident: set[int]) -> int:
    """Bytes autograd really saved: every node's ``_saved_*`` tensors, storages once."""
    seen, storages, stack = set(), {}, [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for attr in dir(node):
            if attr.startswith("_saved_"):
                values = getattr(node, attr)
                for t in values if isinstance(values, (tuple, list)) else [values]:
                    if isinstance(t, torch.Tensor):
                        storage = t.untyped_storage()
                        if storage._cdata not in resident:
                            storages[storage._cdata] = storage.nbytes()
        stack.extend(fn for fn, _ in node.next_functions)
    return sum(storages.values())


class TinyNet(nn.Module):
    """Hand-checkable: conv, BatchNorm, ReLU, pool, a functional add, flatten, linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):  # x: (2, 3, 8, 8)
        y = self.pool(self.relu(self.bn(self.conv(x))))  # (2, 8, 4, 4)
        y = y * y  # a functional op that saves its input
        return self.fc(torch.flatten(y, 1))


def test_layers_in_execution_order_with_functional_ops():
    prof = profile_network(TinyNet(), (2, 3, 8, 8))
    assert [(layer.name, layer.kind, layer.module) for layer in prof.layers] == [
        ("conv", "Conv2d", True), ("bn", "BatchNorm2d", True), ("relu", "ReLU", True),
        ("pool", "MaxPool2d", True), ("mul", "mul", False), ("view", "view", False),
        ("fc", "Linear", True)]
    assert prof.layers[0].input_shapes == [[2, 3, 8, 8]]
    assert prof.layers[3].output_shapes == [[2, 8, 4, 4]]
    assert prof.layers[-1].output_shapes == [[2, 5]]
    assert prof.layers[0].param_bytes == (8 * 3 * 9 + 8) * 4


def test_saved_bytes_per_layer_by_hand():
    prof = profile_network(TinyNet(), (2, 3, 8, 8))
    act = 2 * 8 * 8 * 8 * 4  # one (2, 8, 8, 8) float map
    pooled = 2 * 8 * 4 * 4 * 4
    expected = {
        "conv": 0,  # its input is the batch the caller holds; the weight is a parameter
        "bn": act + 2 * 8 * 4,  # its input, and the batch mean and inverse std
        "relu": act,  # its result
        "pool": 2 * 8 * 4 * 4 * 8,  # int64 indices; its input is relu's result, counted there
        "mul": pooled,  # its input (both operands share a storage)
        "view": 0,
        "fc": pooled,  # the squared map, seen through the flatten view
    }
    assert {layer.name: layer.saved_bytes for layer in prof.layers} == expected


@pytest.mark.parametrize("build, shape", [
    (TinyNet, (2, 3, 8, 8)),
    (lambda: models.resnet18(num_classes=10), (2, 3, 32, 32)),
    (lambda: models.vgg11_bn(num_classes=10), (2, 3, 32, 32)),
])
def test_saved_bytes_equal_what_autograd_saved(build, shape):
    torch.manual_seed(0)
    model = build()
    prof = profile_network(model, shape)
    x = torch.randn(shape)  # the caller holds the batch: resident, like the parameters
    out = model(x)
    resident = _resident_keys(model) | {x.untyped_storage()._cdata}
    assert prof.saved_bytes == _graph_saved_bytes(out, resident)


def test_residual_adds_are_layers():
    prof = profile_network(models.resnet50(), (1, 3, 64, 64))
    adds = [layer for layer in prof.layers if layer.kind == "add_"]
    assert len(adds) == 16  # one per bottleneck
    names = [layer.name for layer in prof.layers]
    first = names.index("layer1.0.add_")
    assert names[first - 1] == "layer1.0.downsample.1" or names[first - 1] == "layer1.0.bn3"
    assert names[first + 1] == "layer1.0.relu#2"


@pytest.mark.parametrize("build, shape", [
    (lambda: models.resnet18(num_classes=10), (4, 3, 64, 64)),
    (lambda: models.vgg11_bn(num_classes=10), (2, 3, 64, 64)),
])
def test_predicted_plain_peak_matches_measured_within_5_percent(build, shape):
    torch.manual_seed(0)
    model = build()
    prof = profile_network(model, shape)  # on meta
    x = torch.randn(shape)
    with DeviceMeter.for_device("cpu") as meter:
        meter.track([*model.parameters(), *model.buffers(), x])
        model(x).sum().backward()
    assert abs(prof.peak_bytes - meter.peak) <= 0.05 * meter.peak


def test_meta_profile_allocates_nothing():
    with torch.device("meta"):
        model = models.resnet152()
    with DeviceMeter.for_device("cpu") as meter:
        prof = profile_network(model, (1024, 3, 224, 224))
    assert prof.peak_bytes > 100 * 2**30  # far more than this machine has
    assert meter.peak < 2**20
    assert len(prof.layers) > 500


def test_backward_flops_of_convolutions():
    prof = profile_network(models.resnet18(), (2, 3, 64, 64))
    conv1, inner = prof.layers[0], prof.layers[7]
    assert (conv1.name, inner.name) == ("conv1", "layer1.0.conv2")
    assert conv1.backward_flops == conv1.forward_flops  # weight gradient only: input needs none
    assert inner.backward_flops == 2 * inner.forward_flops  # input and weight gradients
    assert inner.forward_flops == 2 * 2 * 64 * 16 * 16 * 64 * 9


def test_model_is_left_untouched():
    torch.manual_seed(0)
    model = models.resnet18(num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    profile_network(model, (2, 3, 32, 32), device="cpu", iterations=1)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats too
    assert all(p.grad is None for p in model.parameters())
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks


def test_timed_profile_on_cpu_and_json_round_trip():
    prof = profile_network(models.resnet18(num_classes=10), (2, 3, 32, 32), device="cpu",
                           iterations=2)
    assert prof.timed
    conv = prof.layers[0]
    assert conv.forward_ms > 0 and conv.backward_ms > 0
    again = NetworkProfile.from_json(prof.to_json())
    assert again == prof
    assert "measured forward / backward" in prof.table()


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        profile_network(lambda x: x, (1, 3, 8, 8))
    with pytest.raises(ValueError, match="positive"):
        profile_network(TinyNet(), (0, 3, 8, 8))


@pytest.mark.gpu
def test_predicted_peak_against_cuda_allocator():
    torch.manual_seed(0)
    model = models.resnet18(num_classes=10).cuda()
    shape = (32, 3, 64, 64)
    prof = profile_network(model, shape)
    timed = profile_network(model, shape, device="cuda")
    assert timed.timed and timed.saved_bytes == prof.saved_bytes
    x = torch.randn(shape, device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated() - sum(
        t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers(), x])
    torch.cuda.reset_peak_memory_stats()
    model(x).sum().backward()
    measured = torch.cuda.max_memory_allocated() - base
    assert abs(prof.peak_bytes - measured) <= 0.10 * measured  # cuDNN workspaces are extra


def test_a_shape_only_profile_leaves_tied_and_checkpointed_models_alone():
    """Fake stand-ins replace the model's tensors through backward: a tied weight gets no
    fake gradient, and a checkpoint inside the model recomputes on the stand-ins (its
    BatchNorm's running statistics stay the model's own)."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.bn = nn.BatchNorm1d(16)
            self.head = nn.Linear(16, 50, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, tokens):
            h = self.emb(tokens).mean(1)
            return self.head(torch.utils.checkpoint.checkpoint(self.bn, h, use_reentrant=False))

    model = Tied()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prof = profile_network(model, inputs=(torch.zeros(8, 5, dtype=torch.long),))
    assert prof.peak_bytes > 0 and "bn" in prof.foreign
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
