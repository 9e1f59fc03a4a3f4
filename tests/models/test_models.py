import json
from pathlib import Path

import pytest
import torch

from vmem import models

REFERENCE = json.loads((Path(__file__).parent / "torchvision_reference.json").read_text())

# Parameter counts torchvision publishes for its ImageNet models.
PUBLISHED = {"resnet18": 11_689_512, "resnet50": 25_557_032, "resnet152": 60_192_808,
             "vgg16": 138_357_544, "vgg19": 143_667_240}


def _meta(name: str) -> torch.nn.Module:
    with torch.device("meta"):
        return models.get(name)


@pytest.mark.parametrize("name, count", PUBLISHED.items())
def test_published_parameter_counts(name, count):
    assert sum(p.numel() for p in _meta(name).parameters()) == count


def test_every_torchvision_model_is_here():
    assert set(REFERENCE["models"]) == set(models.names()) - {"resnet20"}


@pytest.mark.parametrize("name", REFERENCE["models"])
def test_state_dict_keys_and_shapes_match_torchvision(name):
    expected = REFERENCE["models"][name]["state_dict"]
    state = {k: list(v.shape) for k, v in _meta(name).state_dict().items()}
    assert state.keys() == expected.keys()
    assert state == expected
    assert sum(p.numel() for p in _meta(name).parameters()) == \
        REFERENCE["models"][name]["parameters"]


@pytest.mark.parametrize("name", [n for n, m in REFERENCE["models"].items() if "logits" in m])
def test_same_initialisation_and_outputs_as_torchvision(name):
    torch.manual_seed(0)
    model = models.get(name).eval()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)[:, :8].flatten()
    expected = torch.tensor(REFERENCE["models"][name]["logits"])
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)


def test_resnet20_is_he_et_al_cifar_resnet():
    model = models.resnet20()
    assert sum(p.numel() for p in model.parameters()) == 272_474  # 0.27 M in the paper
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 19 + 2  # 6n+1 with n=3, plus two 1x1 shortcut convolutions


@pytest.mark.parametrize("name", ["resnet18", "resnet20", "resnet50", "vgg11", "vgg11_bn"])
def test_forward_and_backward_on_small_images(name):
    model = models.get(name, num_classes=7)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="unknown model 'resnet51'.*resnet50"):
        models.get("resnet51")
