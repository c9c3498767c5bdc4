"""CIFAR-style MobileNetV2 (Sandler et al., 2018), the compact student of the KD literature.

CIFAR adaptation (as in the common CIFAR ports): the stem is stride 1 and the second stage is
stride 1 too, so a 32x32 input is downsampled 8x (32 -> 4) instead of 32x, and 28x28 inputs
end at 4x4.  Channel counts are ``width_mult`` times the paper's, rounded to multiples of 8 as in
the authors' code; the final 1x1 convolution keeps 1280 channels for ``width_mult <= 1``.

Layout: stem ``conv1``/``bn1``/``relu`` -> ``layer1``..``layer7`` (one ``nn.Sequential`` per row
of the paper's table) -> ``conv_last`` (1x1 conv-BN-ReLU6 to 1280) -> ``avgpool`` -> ``flatten``
-> ``fc``.
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import conv1x1, conv3x3, init_weights

# (expansion t, output channels c, blocks n, stride s) per stage; strides adapted for CIFAR.
_CIFAR_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),  # stride 2 on ImageNet
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never going below 90% of it.

    Examples:
        >>> make_divisible(24 * 0.5)
        16
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class InvertedResidual(nn.Module):
    """1x1 expand (ReLU6) -> 3x3 depthwise (ReLU6) -> 1x1 linear projection.

    The residual connection exists only when the block keeps the shape (stride 1 and equal
    widths); that is decided at construction, so ``torch.fx`` traces a fixed graph.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [conv1x1(in_channels, hidden), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            conv3x3(hidden, hidden, stride, groups=hidden),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            conv1x1(hidden, out_channels),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2; ``MobileNetV2(0.5)`` has 815,780 parameters on CIFAR-100.

    ``width_mult=0.5`` is the size of the "MobileNetV2" student of the CIFAR-100 KD benchmark
    of CRD (Tian et al., 2020).  CRD's port differs in two details that change the counts a
    little: a stride-2 stem (final map 2x2) and ``int()`` channel rounding (e.g. 12 instead of
    16 channels for the 24-channel stage at width 0.5).  ``width_mult=1.0``: 2,351,972 params.

    Args:
        width_mult: channel multiplier for every layer but the final 1280-channel conv.
        num_classes: size of the ``fc`` output.
        in_channels: 3 for CIFAR, 1 for Fashion-MNIST.

    Examples:
        >>> MobileNetV2(0.5, num_classes=10, in_channels=1)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, width_mult: float = 0.5, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        channels = make_divisible(32 * width_mult)
        self.conv1 = conv3x3(in_channels, channels)  # stride 1: CIFAR images are small
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU6()
        for index, (t, c, n, s) in enumerate(_CIFAR_SETTING, start=1):
            out = make_divisible(c * width_mult)
            blocks = []
            for i in range(n):  # only the first block of a stage changes width or stride
                blocks.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
        last = make_divisible(1280 * max(1.0, width_mult))
        self.conv_last = nn.Sequential(conv1x1(channels, last), nn.BatchNorm2d(last), nn.ReLU6())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(last, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.layer5(x)
        x = self.layer6(x)
        x = self.layer7(x)
        x = self.conv_last(x)
        return self.fc(self.flatten(self.avgpool(x)))


def mobilenetv2(width_mult: float = 0.5, num_classes: int = 10, in_channels: int = 3) -> MobileNetV2:
    """CIFAR MobileNetV2 with the given width multiplier (default 0.5, the KD student).

    Examples:
        >>> mobilenetv2(num_classes=100)(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 100])
    """
    return MobileNetV2(width_mult, num_classes=num_classes, in_channels=in_channels)
