"""Small models of the kinds third-party CNNs are built of, written as their authors write
them (custom ``forward`` methods, concatenations, squeeze-excitation, skips, 3D, custom
autograd Functions, ``nn.Sequential`` subclasses): what recomputation must handle."""

import torch
import torch.nn.functional as F
from torch import nn


def _bn_act(channels, act=nn.ReLU, dims=2):
    norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
    return [norm(channels), act(inplace=True)]


class Basic(nn.Module):
    """A residual block with its own forward (torchvision's BasicBlock shape)."""

    def __init__(self, channels, stride=1):
        super().__init__()
        out = channels * stride
        self.conv1 = nn.Conv2d(channels, out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.short = None if stride == 1 else nn.Sequential(
            nn.Conv2d(channels, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.short is None else self.short(x)))


class Residual(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), *_bn_act(8))
        self.blocks = nn.Sequential(*(Basic(8) for _ in range(6)), Basic(8, 2), Basic(16))
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class DenseLayer(nn.Module):
    def __init__(self, channels, growth):
        super().__init__()
        self.norm, self.conv = nn.BatchNorm2d(channels), nn.Conv2d(channels, growth, 3,
                                                                   padding=1, bias=False)

    def forward(self, features):
        return self.conv(F.relu(self.norm(torch.cat(features, 1))))


class DenseBlock(nn.ModuleDict):
    """DenseNet's: a ModuleDict whose forward concatenates what every layer made."""

    def __init__(self, layers, channels, growth):
        super().__init__({f"layer{i}": DenseLayer(channels + i * growth, growth)
                          for i in range(layers)})

    def forward(self, x):
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Dense(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = DenseBlock(8, 8, 6)
        self.head = nn.Linear(8 + 8 * 6, classes)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


class SqueezeExcite(nn.Module):
    def __init__(self, channels, squeezed):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(channels, squeezed, 1), nn.Conv2d(squeezed, channels, 1)

    def forward(self, x):
        scale = torch.sigmoid(self.fc2(F.silu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return x * scale


class MBConv(nn.Module):
    """EfficientNet's inverted residual: expand, depthwise, squeeze-excite, project."""

    def __init__(self, channels, expand=4):
        super().__init__()
        hidden = channels * expand
        self.block = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), *_bn_act(hidden, nn.SiLU),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
            *_bn_act(hidden, nn.SiLU), SqueezeExcite(hidden, channels // 2),
            nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        return x + self.block(x)


class Efficient(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False),
                                  *_bn_act(8, nn.SiLU))
        self.layers = nn.Sequential(MBConv(8), MBConv(8), MBConv(8))
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        return self.head(self.layers(self.stem(x)).mean((2, 3)))


class UNet(nn.Module):
    """Two levels down, two up, skips concatenated; 2D or 3D."""

    def __init__(self, dims=2, classes=3):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        up = nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d
        pool = nn.MaxPool2d if dims == 2 else nn.MaxPool3d

        def stage(cin, cout):
            return nn.Sequential(conv(cin, cout, 3, padding=1, bias=False),
                                 *_bn_act(cout, dims=dims),
                                 conv(cout, cout, 3, padding=1, bias=False),
                                 *_bn_act(cout, dims=dims))

        self.down1, self.down2, self.bottom = stage(1, 4), stage(4, 8), stage(8, 16)
        self.pool = pool(2)
        self.up2, self.dec2 = up(16, 8, 2, 2), stage(16, 8)
        self.up1, self.dec1 = up(8, 4, 2, 2), stage(8, 4)
        self.out = conv(4, classes, 1)

    def forward(self, x):
        a = self.down1(x)
        b = self.down2(self.pool(a))
        c = self.bottom(self.pool(b))
        b = self.dec2(torch.cat([self.up2(c), b], 1))
        return self.out(self.dec1(torch.cat([self.up1(b), a], 1)))


class ScaledTanh(torch.autograd.Function):
    """A custom Function with its own saves and backward."""

    @staticmethod
    def forward(ctx, x, scale):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        ctx.scale = scale
        return y * scale

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * ctx.scale * (1 - y * y), None


class CustomBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv2(ScaledTanh.apply(self.conv1(x), 0.5)) + x


class Custom(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(*(CustomBlock(8) for _ in range(6)))
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


class Concurrent(nn.Sequential):
    """pytorchcv's pattern: an nn.Sequential subclass whose forward sums its children."""

    def forward(self, x):
        return sum(branch(x) for branch in self)


class Branchy(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)

        def branch(k):
            return nn.Sequential(nn.Conv2d(8, 8, k, padding=k // 2), *_bn_act(8))

        self.mixes = nn.Sequential(*(Concurrent(branch(1), branch(3), branch(5))
                                     for _ in range(4)))
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        return self.head(self.mixes(self.stem(x)).mean((2, 3)))


def top_level_sequential(classes=10):
    """A model that is an nn.Sequential of leaf layers."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), *_bn_act(8),
                         *(layer for _ in range(5)
                           for layer in (nn.Conv2d(8, 8, 3, padding=1), *_bn_act(8))),
                         nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), *_bn_act(16),
                         nn.Conv2d(16, 16, 3, padding=1), *_bn_act(16),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes))


class Iterating(nn.Module):
    """A forward that iterates its own nn.Sequential (the Sequential's forward never runs)."""

    def __init__(self, classes=10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), *_bn_act(8),
                                      *(layer for _ in range(5) for layer in (
                                          nn.Conv2d(8, 8, 3, padding=1), *_bn_act(8))))
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index % 3 == 2:
                x = x + 0.1 * x.mean()  # work between the children
        return self.head(x.mean((2, 3)))


# name -> (builder, input shape, target kind: "class" labels or "mask" per voxel)
ZOO = {
    "residual": (Residual, (8, 3, 32, 32), "class"),
    "dense": (Dense, (8, 3, 32, 32), "class"),
    "mbconv_se": (Efficient, (8, 3, 32, 32), "class"),
    "unet2d": (lambda: UNet(2), (4, 1, 32, 32), "mask"),
    "unet3d": (lambda: UNet(3), (2, 1, 16, 16, 16), "mask"),
    "custom_function": (Custom, (8, 3, 32, 32), "class"),
    "sequential_subclass": (Branchy, (8, 3, 32, 32), "class"),
    "top_level_sequential": (top_level_sequential, (8, 3, 32, 32), "class"),
    "iterating": (Iterating, (8, 3, 32, 32), "class"),
}
