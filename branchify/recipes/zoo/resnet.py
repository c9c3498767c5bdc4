"""CIFAR ResNets (He et al., 2016) as used by the online-KD papers (DML, ONE, CL-ILR, OKDDip, PCL).

Layout: stem ``conv1``/``bn1``/``relu`` -> ``layer1``/``layer2``/``layer3`` (``nn.Sequential`` of
blocks, widths 16/32/64, strides 1/2/2) -> ``avgpool`` -> ``flatten`` -> ``fc``.

Shortcuts: He et al.'s CIFAR networks use "option A" (a strided identity with zero-padded
channels).  We use "option B" instead: a 1x1 conv + BN projection wherever the shape changes,
i.e. in the first block of ``layer2`` and ``layer3`` (and of every stage for bottlenecks).  It
traces as ordinary modules, needs no custom padding op, and is what the online-KD reference code
(built on torchvision's ResNet) does.  It costs 2,752 extra parameters for basic-block networks.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ._common import conv1x1, conv3x3, init_weights


def _projection(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Shortcut for a block: identity when shapes match, else 1x1 conv + BN ("option B")."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (post-activation, He et al. 2016a).

    Every module is called exactly once in ``forward`` (hence ``relu1``/``relu2`` rather than one
    shared ReLU) so that a module name identifies a single tensor in the ``torch.fx`` graph.
    ReLUs are not in-place so that tensors tapped from the graph are never mutated afterwards.
    """

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = conv3x3(in_channels, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = conv3x3(planes, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = _projection(in_channels, out_channels, stride)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.shortcut(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu2(out)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 -> 1x1 expand (x4) with a residual connection (post-activation)."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = conv1x1(in_channels, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = conv1x1(planes, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = _projection(in_channels, out_channels, stride)
        self.relu3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.shortcut(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = out + identity
        return self.relu3(out)


_BLOCKS: dict[str, tuple[type[nn.Module], int]] = {
    # block name -> (class, convolutions per block); depth = per_block * 3 * n + 2
    "basic": (BasicBlock, 2),
    "bottleneck": (Bottleneck, 3),
}


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth ``6n+2`` (basic blocks) or ``9n+2`` (bottleneck blocks).

    Parameter counts for CIFAR-100 (3 input channels, 100 classes):

    * ``CifarResNet(32)`` = ResNet-32: 472,756 (0.47M). Setting of DML / ONE / OKDDip / PCL.
    * ``CifarResNet(110)`` = ResNet-110: 1,736,564 (1.7M), He et al.'s BasicBlock n=18 network.
    * ``CifarResNet(110, block="bottleneck")``: 1,170,868 (1.17M). This is what the ONE / OKDDip /
      PCL reference code actually builds under the name "resnet110" (Bottleneck, [12, 12, 12]).

    The first block of each stage changes the shape (stride or width); every later block is
    shape-preserving, so more blocks can be appended to a stage.

    Args:
        depth: total number of weighted layers (stem conv + block convs + fc).
        num_classes: size of the ``fc`` output.
        in_channels: 3 for CIFAR, 1 for Fashion-MNIST.
        block: ``"basic"`` (two 3x3 convs) or ``"bottleneck"`` (1x1-3x3-1x1, expansion 4).

    Examples:
        >>> net = CifarResNet(20, num_classes=10, in_channels=1)
        >>> net(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        in_channels: int = 3,
        block: Literal["basic", "bottleneck"] = "basic",
    ) -> None:
        super().__init__()
        if block not in _BLOCKS:
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
        block_cls, convs_per_block = _BLOCKS[block]
        per_stage = 3 * convs_per_block
        if depth < per_stage + 2 or (depth - 2) % per_stage != 0:
            examples = ", ".join(str(per_stage * n + 2) for n in (1, 2, 3, 5, 18))
            raise ValueError(
                f"CifarResNet depth must be {per_stage}n+2 for block={block!r} "
                f"(e.g. {examples}), got {depth}"
            )
        n = (depth - 2) // per_stage

        self.conv1 = conv3x3(in_channels, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self._in = 16
        self.layer1 = self._make_stage(block_cls, 16, n, stride=1)
        self.layer2 = self._make_stage(block_cls, 32, n, stride=2)
        self.layer3 = self._make_stage(block_cls, 64, n, stride=2)
        # Adaptive pooling makes the head independent of the input size (32x32 -> 8x8, 28x28 -> 7x7).
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(64 * block_cls.expansion, num_classes)
        init_weights(self)

    def _make_stage(self, block_cls: type[nn.Module], planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = []
        for i in range(n):
            blocks.append(block_cls(self._in, planes, stride if i == 0 else 1))
            self._in = planes * block_cls.expansion
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-20 (BasicBlock, n=3): 278,324 parameters on CIFAR-100; the CPU demo's model.

    Examples:
        >>> resnet20(num_classes=10, in_channels=1)(torch.zeros(1, 1, 28, 28)).shape
        torch.Size([1, 10])
    """
    return CifarResNet(20, num_classes=num_classes, in_channels=in_channels, block="basic")


def resnet32(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-32 (BasicBlock, n=5): 472,756 parameters on CIFAR-100.

    Examples:
        >>> resnet32(num_classes=100)(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 100])
    """
    return CifarResNet(32, num_classes=num_classes, in_channels=in_channels, block="basic")


def resnet110(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-110 (BasicBlock, n=18, He et al.'s 1.7M network): 1,736,564 parameters on CIFAR-100.

    Examples:
        >>> resnet110(num_classes=10, in_channels=1)(torch.zeros(1, 1, 28, 28)).shape
        torch.Size([1, 10])
    """
    return CifarResNet(110, num_classes=num_classes, in_channels=in_channels, block="basic")
