"""CIFAR VGG-16 with BatchNorm, the VGG setting of the online-KD papers (CL-ILR, OKDDip, PCL)."""

from __future__ import annotations

import torch
from torch import nn

from ._common import conv3x3, init_weights

# Output widths of the 13 convolutions, grouped into the five stages that end in a max-pool.
_VGG16_STAGES: tuple[tuple[int, ...], ...] = (
    (64, 64),
    (128, 128),
    (256, 256, 256),
    (512, 512, 512),
    (512, 512, 512),
)


class VGG(nn.Module):
    """CIFAR VGG with BN: stages ``layer1``..``layer5`` -> ``avgpool`` -> ``flatten`` -> ``fc``.

    ``VGG()`` (the ``vgg16`` configuration) has 14,770,212 parameters on CIFAR-100
    (14.7M conv/BN + a single 512 -> 100 classifier), the VGG-16 of OKDDip / PCL.

    Each stage is ``[conv3x3, BN, ReLU] * k`` followed by ``MaxPool2d(2, ceil_mode=True)``.
    ``ceil_mode`` changes nothing for 32x32 inputs (32 -> 16 -> 8 -> 4 -> 2 -> 1) but keeps
    28x28 Fashion-MNIST alive through five pools (28 -> 14 -> 7 -> 4 -> 2 -> 1) instead of
    shrinking to 0x0 at the fifth.

    Args:
        stages: output widths of the convolutions of each stage.
        num_classes: size of the ``fc`` output.
        in_channels: 3 for CIFAR, 1 for Fashion-MNIST.

    Examples:
        >>> VGG(num_classes=10, in_channels=1)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        stages: tuple[tuple[int, ...], ...] = _VGG16_STAGES,
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if len(stages) != 5:
            raise ValueError(f"VGG expects 5 stages (one per max-pool), got {len(stages)}")
        channels = in_channels
        for index, widths in enumerate(stages, start=1):
            layers: list[nn.Module] = []
            for width in widths:
                layers += [conv3x3(channels, width), nn.BatchNorm2d(width), nn.ReLU()]
                channels = width
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
            self.add_module(f"layer{index}", nn.Sequential(*layers))
        # After five pools the map is 1x1 for both 32x32 and 28x28; the adaptive pool only
        # guards other sizes and keeps the head identical to the other families.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.layer5(x)
        return self.fc(self.flatten(self.avgpool(x)))


def vgg16(num_classes: int = 10, in_channels: int = 3) -> VGG:
    """VGG-16 with BN for CIFAR: 14,770,212 parameters on CIFAR-100.

    Examples:
        >>> vgg16(num_classes=100)(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 100])
    """
    return VGG(_VGG16_STAGES, num_classes=num_classes, in_channels=in_channels)
