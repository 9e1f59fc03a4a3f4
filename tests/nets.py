"""Small networks whose activations, not parameters, dominate memory (as in real training)."""

import torch
from torch import nn

from vmem.models.resnet import BasicBlock
from vmem.models.vgg import _make_features

SHAPE = (8, 3, 32, 32)  # the batch every test trains on


class SmallResNet(nn.Module):
    """A stem and two BasicBlocks (one with a downsample): residual adds between modules."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        down = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
        self.layer1 = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 32, 2, down))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):  # (N, 3, 32, 32)
        x = self.layer1(self.relu(self.bn1(self.conv1(x))))  # (N, 32, 16, 16)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class SmallVGGBN(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            nn.MaxPool2d(2))
        self.classifier = nn.Linear(32 * 8 * 8, num_classes)

    def forward(self, x):  # (N, 3, 32, 32)
        return self.classifier(torch.flatten(self.features(x), 1))


class SavedTwiceToy(nn.Module):
    """Saves one storage twice (``a * a``) and saves strided views (a transpose, a slice)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 16 * 32, num_classes)

    def forward(self, x):  # (N, 3, 32, 32)
        a = self.conv(x)  # (N, 16, 32, 32)
        b = a * a  # mul saves a, twice
        v = b.transpose(2, 3)  # a view of b
        c = torch.sin(v[:, :, ::2])  # sin saves a strided view of b: (N, 16, 16, 32)
        d = self.conv2(c.contiguous())
        return self.fc(torch.flatten(d, 1))


class SmallVGG16(nn.Module):
    """VGG-16-BN's thirteen convolutions and five pools, at an eighth of the channels."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        config = [8, 8, "M", 16, 16, "M", 32, 32, 32, "M", 64, 64, 64, "M", 64, 64, 64, "M"]
        self.features = _make_features(config, batch_norm=True)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x):  # (N, 3, 32k, 32k)
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


NETS = {"resnet": SmallResNet, "vgg_bn": SmallVGGBN, "saved_twice": SavedTwiceToy}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return {**NETS, "vgg16": SmallVGG16}[name]()
