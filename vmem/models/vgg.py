"""VGG-11/13/16/19, with and without BatchNorm, in torchvision's layout and state_dict keys.

Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition"
(2014), as torchvision.models.vgg builds it (adaptive 7x7 average pool before the classifier).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["VGG", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19",
           "vgg19_bn"]

# Output channels of each 3x3 convolution; "M" is a 2x2 max pool.
_CONFIGS: dict[str, list[int | str]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512,
          512, 512, "M"],
}


def _make_features(config: list[int | str], batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_channels = 3
    for v in config:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        layers.append(nn.Conv2d(in_channels, int(v), kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(int(v)))
        layers.append(nn.ReLU(inplace=True))
        in_channels = int(v)
    return nn.Sequential(*layers)


class VGG(nn.Module):
    def __init__(self, features: nn.Sequential, num_classes: int = 1000,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 3, H, W)
        x = self.avgpool(self.features(x))  # (N, 512, 7, 7)
        return self.classifier(torch.flatten(x, 1))  # (N, num_classes)


def _vgg(config: str, batch_norm: bool, num_classes: int) -> VGG:
    return VGG(_make_features(_CONFIGS[config], batch_norm), num_classes)


def vgg11(num_classes: int = 1000) -> VGG:
    return _vgg("A", False, num_classes)


def vgg11_bn(num_classes: int = 1000) -> VGG:
    return _vgg("A", True, num_classes)


def vgg13(num_classes: int = 1000) -> VGG:
    return _vgg("B", False, num_classes)


def vgg13_bn(num_classes: int = 1000) -> VGG:
    return _vgg("B", True, num_classes)


def vgg16(num_classes: int = 1000) -> VGG:
    return _vgg("D", False, num_classes)


def vgg16_bn(num_classes: int = 1000) -> VGG:
    return _vgg("D", True, num_classes)


def vgg19(num_classes: int = 1000) -> VGG:
    return _vgg("E", False, num_classes)


def vgg19_bn(num_classes: int = 1000) -> VGG:
    return _vgg("E", True, num_classes)
