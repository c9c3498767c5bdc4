"""Tiny models shared by the tests (CI has 2 CPU cores)."""
from __future__ import annotations

import torch
from torch import nn


class ToyResidual(nn.Module):
    """A residual whose shortcut crosses the cut when split at ``block.conv2``."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Module()
        self.block.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.block.relu = nn.ReLU(inplace=True)
        self.block.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.stem(x)
        identity = x
        out = self.block.conv2(self.block.relu(self.block.conv1(x)))
        out = out + identity
        return self.fc(self.head(out))


class Stages(nn.Module):
    """A tiny CIFAR-ResNet-like net with repeatable blocks in ``layer2`` (for deepening)."""

    class Block(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(c)
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            return self.relu(self.bn(self.conv(x)) + x)

    def __init__(self, num_classes: int = 4, width: int = 8, blocks: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(*[Stages.Block(width) for _ in range(blocks)])
        self.layer2 = nn.Sequential(*[Stages.Block(width) for _ in range(blocks)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.pool(x), 1))
