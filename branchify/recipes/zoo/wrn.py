"""Wide ResNets with pre-activation blocks (Zagoruyko & Komodakis, 2016) for CIFAR.

"WRN-20-8" in the online-KD papers (OKDDip, PCL, and the KDCL/OKDPH code that follows them) does
not fit the WRN paper's ``depth = 6n+4`` rule.  Their reference code builds it as a *bottleneck*
ResNet with two blocks per stage (``depth = 9*2+2 = 20``) whose middle 3x3 convolution is eight
times wider than usual (torchvision's ``width_per_group = 64*8``), outputs 64/128/256 channels.
``wrn_20_8`` reproduces that shape with pre-activation ordering (BN-ReLU-conv), so the parameter
count differs from the reference only by the BatchNorm sizes.  The classic basic-block WRN of the
WRN paper (e.g. WRN-28-10, WRN-16-4) is available with ``block="basic"``.

Layout: stem ``conv1`` -> ``layer1``/``layer2``/``layer3`` -> ``bn``/``relu`` (the closing
pre-activation) -> ``avgpool`` -> ``flatten`` -> ``fc``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ._common import PreActNet, conv1x1, conv3x3


class PreActBasicBlock(nn.Module):
    """BN-ReLU-conv3x3 twice; ``width`` output channels (the WRN paper's block, no dropout).

    When the shape changes, the 1x1 projection shortcut reads the pre-activated input, as in the
    WRN authors' code; otherwise the raw input is added back.
    """

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.out_channels = width
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = conv3x3(in_channels, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU()
        self.conv2 = conv3x3(width, width)
        self.has_projection = stride != 1 or in_channels != width
        if self.has_projection:
            self.shortcut = conv1x1(in_channels, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        # ``has_projection`` is fixed at construction, so torch.fx traces a single branch.
        identity = self.shortcut(pre) if self.has_projection else x
        out = self.conv1(pre)
        out = self.conv2(self.relu2(self.bn2(out)))
        return out + identity


class PreActBottleneck(nn.Module):
    """BN-ReLU-conv1x1 (-> planes*widen), BN-ReLU-conv3x3, BN-ReLU-conv1x1 (-> planes*4)."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, widen: int, stride: int = 1) -> None:
        super().__init__()
        width = planes * widen
        self.out_channels = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = conv1x1(in_channels, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU()
        self.conv2 = conv3x3(width, width, stride)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU()
        self.conv3 = conv1x1(width, self.out_channels)
        self.has_projection = stride != 1 or in_channels != self.out_channels
        if self.has_projection:
            self.shortcut = conv1x1(in_channels, self.out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        identity = self.shortcut(pre) if self.has_projection else x
        out = self.conv1(pre)
        out = self.conv2(self.relu2(self.bn2(out)))
        out = self.conv3(self.relu3(self.bn3(out)))
        return out + identity


class WideResNet(PreActNet):
    """Pre-activation Wide ResNet for CIFAR.

    * ``block="bottleneck"``: ``depth = 9n+2``; stage ``s`` has planes 16/32/64, middle width
      ``planes*widen`` and output ``planes*4``.  ``WideResNet(20, 8)`` is the online-KD papers'
      WRN-20-8: 6,870,324 parameters on CIFAR-100 (output 256 channels).
    * ``block="basic"``: ``depth = 6n+4``, widths ``16k/32k/64k`` (WRN paper).  For reference
      ``WideResNet(28, 10, block="basic")`` is WRN-28-10 with 36.5M parameters on CIFAR-100.

    The first block of each stage changes the shape; later blocks are shape-preserving.

    Args:
        depth: number of layers, see the two rules above.
        widen: width multiplier ``k``.
        num_classes: size of the ``fc`` output.
        in_channels: 3 for CIFAR, 1 for Fashion-MNIST.
        block: ``"bottleneck"`` (default, the papers' WRN-20-8) or ``"basic"``.

    Examples:
        >>> net = WideResNet(16, 2, num_classes=10, in_channels=1, block="basic")
        >>> net(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        depth: int = 20,
        widen: int = 8,
        num_classes: int = 10,
        in_channels: int = 3,
        block: Literal["basic", "bottleneck"] = "bottleneck",
    ) -> None:
        super().__init__()
        if widen < 1:
            raise ValueError(f"widen must be a positive integer, got {widen}")
        if block == "bottleneck":
            if depth < 11 or (depth - 2) % 9 != 0:
                raise ValueError(
                    f"bottleneck WideResNet depth must be 9n+2 (e.g. 11, 20, 29), got {depth}"
                )
            n = (depth - 2) // 9
        elif block == "basic":
            if depth < 10 or (depth - 4) % 6 != 0:
                raise ValueError(
                    f"basic WideResNet depth must be 6n+4 (e.g. 10, 16, 22, 28, 40), got {depth}"
                )
            n = (depth - 4) // 6
        else:
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")

        # Pre-activation networks start with a bare conv: the first block normalises its input.
        self.conv1 = conv3x3(in_channels, 16)
        channels = 16
        for index, (planes, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
            blocks: list[nn.Module] = []
            for i in range(n):
                s = stride if i == 0 else 1
                if block == "bottleneck":
                    blk: nn.Module = PreActBottleneck(channels, planes, widen, s)
                else:
                    blk = PreActBasicBlock(channels, planes * widen, s)
                blocks.append(blk)
                channels = blk.out_channels
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
        # Blocks end with an un-normalised sum, so a final BN-ReLU precedes pooling.
        self._add_head(channels, num_classes)


def wrn(
    depth: int = 20,
    widen: int = 8,
    num_classes: int = 10,
    in_channels: int = 3,
    block: Literal["basic", "bottleneck"] = "bottleneck",
) -> WideResNet:
    """Build a pre-activation Wide ResNet; see :class:`WideResNet` for the depth rules.

    Examples:
        >>> wrn(16, 4, num_classes=100, block="basic")(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 100])
    """
    return WideResNet(depth, widen, num_classes=num_classes, in_channels=in_channels, block=block)


def wrn_20_8(num_classes: int = 10, in_channels: int = 3) -> WideResNet:
    """WRN-20-8 of the online-KD papers (bottleneck, 2 blocks/stage, 8x wide middle conv).

    Examples:
        >>> wrn_20_8(num_classes=100)(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 100])
    """
    return WideResNet(20, 8, num_classes=num_classes, in_channels=in_channels, block="bottleneck")
