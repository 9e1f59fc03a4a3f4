"""Reference networks with torchvision's architectures and state_dict keys.

``resnet20`` is the exception: He et al.'s small ResNet for 32x32 images, which torchvision
does not have; vmem trains it on the emulated device.

torchvision does not import against every torch build (the CPU build on our development
machines among them), so vmem ships its own ResNet and VGG definitions; they are drop-ins:
a torchvision checkpoint loads with ``load_state_dict`` unchanged.

Example::

    >>> from vmem import models
    >>> net = models.get("resnet50", num_classes=10)
    >>> sorted(models.names())[:3]
    ['resnet101', 'resnet152', 'resnet18']
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .resnet import (
    CifarResNet,
    ResNet,
    resnet18,
    resnet20,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
)
from .vgg import VGG, vgg11, vgg11_bn, vgg13, vgg13_bn, vgg16, vgg16_bn, vgg19, vgg19_bn

__all__ = ["CifarResNet", "ResNet", "VGG", "get", "names", "resnet18", "resnet20", "resnet34",
           "resnet50", "resnet101", "resnet152", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16",
           "vgg16_bn", "vgg19", "vgg19_bn"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    f.__name__: f
    for f in (resnet18, resnet20, resnet34, resnet50, resnet101, resnet152, vgg11, vgg11_bn, vgg13,
              vgg13_bn, vgg16, vgg16_bn, vgg19, vgg19_bn)
}


def names() -> list[str]:
    """The names :func:`get` accepts."""
    return list(_REGISTRY)


def get(name: str, num_classes: int = 1000) -> nn.Module:
    """Build a reference model by name, e.g. ``get("vgg16")``; unknown names raise ValueError."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name](num_classes=num_classes)
