"""CIFAR DenseNets (Huang et al., 2017): DenseNet-40-12 and, optionally, the BC variant.

Layout: stem ``conv1`` -> ``layer1`` (dense block) -> ``layer2`` (transition + dense block)
-> ``layer3`` (transition + dense block) -> ``bn``/``relu`` -> ``avgpool`` -> ``flatten`` -> ``fc``.
Each downsampling transition opens its stage, mirroring the ResNets where the first block of
``layer2``/``layer3`` downsamples; so ``layer3`` works at 8x8 (7x7 for 28x28) in every family.

Note: the "densenet-40-12" of the ONE / OKDDip / PCL reference code is the BC variant
(``block_config=[6, 6, 6]``, 132 output channels, 0.19M parameters).  ``densenet40_12`` here is
the original, BC-free DenseNet-40 (k=12) as the recipes ask; ``DenseNet(40, 12, bc=True)``
builds the reference code's network.
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import PreActNet, conv1x1, conv3x3


class DenseLayer(nn.Module):
    """BN-ReLU-conv3x3 producing ``growth`` maps, concatenated to its input.

    With ``bc=True`` a BN-ReLU-conv1x1 bottleneck to ``4*growth`` maps comes first (DenseNet-B).
    The output has ``in_channels + growth`` channels.
    """

    def __init__(self, in_channels: int, growth: int, bc: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        if bc:
            layers += [nn.BatchNorm2d(channels), nn.ReLU(), conv1x1(channels, 4 * growth)]
            channels = 4 * growth
        layers += [nn.BatchNorm2d(channels), nn.ReLU(), conv3x3(channels, growth)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], dim=1)


def _transition(in_channels: int, out_channels: int) -> nn.Sequential:
    """BN-ReLU-conv1x1-avgpool2: halves the resolution between dense blocks."""
    return nn.Sequential(
        nn.BatchNorm2d(in_channels),
        nn.ReLU(),
        conv1x1(in_channels, out_channels),
        nn.AvgPool2d(kernel_size=2, stride=2),
    )


class DenseNet(PreActNet):
    """CIFAR DenseNet with three dense blocks.

    * ``DenseNet(40, 12)`` = DenseNet-40 (k=12), 12 layers per block, no bottleneck, no
      compression (160 -> 304 -> 448 channels): 1,060,132 parameters on CIFAR-100.  This is
      the DenseNet-40-12 setting listed by OKDDip / PCL.
    * ``DenseNet(40, 12, bc=True)`` = DenseNet-BC-40-12 (6 bottleneck layers per block,
      compression 0.5, 132 output channels): 188,092 parameters on CIFAR-100; what the papers'
      reference code runs under the same name.

    Args:
        depth: ``3n+4`` (plain) or ``6n+4`` (BC), ``n`` dense layers per block.
        growth: growth rate ``k``.
        num_classes: size of the ``fc`` output.
        in_channels: 3 for CIFAR, 1 for Fashion-MNIST.
        bc: use bottleneck layers, compression 0.5 and a ``2k``-wide stem (DenseNet-BC).

    Examples:
        >>> DenseNet(22, 4, num_classes=10, in_channels=1)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        depth: int = 40,
        growth: int = 12,
        num_classes: int = 10,
        in_channels: int = 3,
        bc: bool = False,
    ) -> None:
        super().__init__()
        convs_per_layer = 2 if bc else 1
        per_depth = 3 * convs_per_layer
        if depth < per_depth + 4 or (depth - 4) % per_depth != 0:
            raise ValueError(
                f"DenseNet depth must be {per_depth}n+4 for bc={bc} "
                f"(e.g. {per_depth * 4 + 4}, {per_depth * 12 + 4}), got {depth}"
            )
        n = (depth - 4) // per_depth
        channels = 2 * growth if bc else 16  # stem widths from the DenseNet authors' code
        self.conv1 = conv3x3(in_channels, channels)
        for index in (1, 2, 3):
            modules: list[nn.Module] = []
            if index > 1:
                out = channels // 2 if bc else channels
                modules.append(_transition(channels, out))
                channels = out
            for _ in range(n):
                modules.append(DenseLayer(channels, growth, bc))
                channels += growth
            self.add_module(f"layer{index}", nn.Sequential(*modules))
        self._add_head(channels, num_classes)


def densenet40_12(num_classes: int = 10, in_channels: int = 3) -> DenseNet:
    """DenseNet-40 with growth rate 12 (BC-free): 1,060,132 parameters on CIFAR-100.

    Examples:
        >>> densenet40_12(num_classes=100)(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 100])
    """
    return DenseNet(40, 12, num_classes=num_classes, in_channels=in_channels, bc=False)
