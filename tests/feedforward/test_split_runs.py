"""Finding runs of splittable layers and running them split, leaving the model as it was."""

import copy

import pytest
import torch
from nets import build

from vmem import models
from vmem.feedforward.split_runs import Run, SplitRun, Splits, find_runs


def test_runs_are_vgg_blocks_and_resnet_downsamples():
    runs = find_runs(models.vgg16())
    assert [(r.start, r.stop) for r in runs] == [(0, 5), (5, 10), (10, 17), (17, 24),
                                                 (24, 31)]
    assert {r.container for r in runs} == {"features"}
    downsamples = find_runs(models.resnet50())
    assert downsamples[0] == Run("layer1.0.downsample", 0, 2)
    assert all(r.container.endswith("downsample") for r in downsamples)


def test_splits_change_no_state_and_leave_no_trace():
    model = build("vgg16")
    twin = copy.deepcopy(model)
    keys = list(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    runs = find_runs(model)
    with Splits(model, {runs[0]: (4, 2), runs[1]: (2, 0), runs[2]: (1, 2)}):
        assert list(model.state_dict()) == keys
        assert sum(isinstance(m, SplitRun) for m in model.modules()) == 3  # one recomputed
        out = model(x)
    assert "forward" not in vars(model.features)
    assert not any(isinstance(m, SplitRun) for m in model.modules())
    assert len(model.features) == len(twin.features)
    torch.testing.assert_close(out, twin(x), rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(model.buffers(), twin.buffers(), strict=True):
        torch.testing.assert_close(mine, theirs)  # running statistics updated once each


def test_a_split_run_is_one_layer_to_the_profiler():
    from vmem.preprocessing import profile_network
    model = build("vgg16")
    runs = find_runs(model)
    with Splits(model, {runs[0]: (4, 2)}):
        prof = profile_network(model, (2, 3, 64, 64))
    names = [layer.name for layer in prof.layers]
    assert runs[0].module_name in names
    assert not set(runs[0].layer_names()) & set(names)
    split = prof.layers[names.index(runs[0].module_name)]
    assert split.saved_tensors == 0  # its only save is the model's input, which stays
    second = prof.layers[names.index("features.7")]
    assert second.saved_bytes > 0


def test_runs_start_at_a_convolution_and_an_in_place_first_layer_is_refused():
    from torch import nn

    from vmem.feedforward.split import split_forward
    model = nn.Module()
    model.f = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.ReLU(inplace=True),
                            nn.Conv2d(4, 4, 3))
    assert find_runs(model) == [Run("f", 0, 2), Run("f", 3, 4)]
    with pytest.raises(ValueError, match="in place and first"):
        split_forward([nn.ReLU(inplace=True), nn.Conv2d(3, 3, 1)], torch.randn(1, 3, 8, 8), 2)


def test_a_failed_install_leaves_nothing_behind():
    from torch import nn
    model = nn.Module()
    model.f = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2),
                            nn.Conv2d(4, 4, 3, padding="same"))
    unsplittable = Run("f", 2, 3)  # not a run find_runs gives: its padding is a string
    with pytest.raises(ValueError, match="padding as numbers"):
        with Splits(model, {find_runs(model)[0]: (2, 2), unsplittable: (2, 2)}):
            pass
    assert len(model.f) == 3 and "forward" not in vars(model.f)
