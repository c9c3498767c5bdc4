"""Hand-written multi-branch ResNet-32 trees: what a researcher writes without branchify.

Each class builds its branches by instantiating fresh ResNet-32s and wiring their stages by
hand, exactly like the authors' code does (shared stem/stages, re-instantiated last stages).
They return a list of leaf logits, leaf order as in branchify (depth-first, child 0 first).
"""
from __future__ import annotations

import torch
from torch import nn

from recipes.zoo import resnet32


def _stem(net: nn.Module) -> nn.Sequential:
    return nn.Sequential(net.conv1, net.bn1, net.relu, net.layer1)


def _head(net: nn.Module) -> nn.Sequential:
    return nn.Sequential(net.layer3, net.avgpool, net.flatten, net.fc)


class HandONE(nn.Module):
    """ONE's tree: shared stem + layer1 + layer2, ``k`` independent layer3 + classifier heads."""

    def __init__(self, k: int = 3, num_classes: int = 100, in_channels: int = 3) -> None:
        super().__init__()
        nets = [resnet32(num_classes, in_channels) for _ in range(k)]
        self.trunk = nn.Sequential(*_stem(nets[0]), nets[0].layer2)
        self.heads = nn.ModuleList(_head(n) for n in nets)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.trunk(x)
        return [head(h) for head in self.heads]


class HandTSA(nn.Module):
    """TSA-2-3: shared stem + layer1; 2 layer2 branches, each with 2 layer3 leaves (4 leaves)."""

    def __init__(self, num_classes: int = 100, in_channels: int = 3, m: int = 2) -> None:
        super().__init__()
        nets = [resnet32(num_classes, in_channels) for _ in range(m * m)]
        self.trunk = _stem(nets[0])
        self.mid = nn.ModuleList(nets[i * m].layer2 for i in range(m))
        self.heads = nn.ModuleList(_head(n) for n in nets)
        self.m = m

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.trunk(x)
        out = []
        for i, mid in enumerate(self.mid):
            g = mid(h)
            out.extend(self.heads[i * self.m + j](g) for j in range(self.m))
        return out


class HandAHBF(nn.Module):
    """AHBF's tree: shared stem + layer1 + layer2; leaf m has layer3 with 5 + a*m blocks."""

    def __init__(self, k: int = 4, a: int = 4, num_classes: int = 100, in_channels: int = 3) -> None:
        super().__init__()
        nets = [resnet32(num_classes, in_channels) for _ in range(k)]
        self.trunk = nn.Sequential(*_stem(nets[0]), nets[0].layer2)
        for m, net in enumerate(nets):
            last = net.layer3[-1]
            for _ in range(a * m):
                net.layer3.append(type(last)(64, 64, 1))
        self.heads = nn.ModuleList(_head(n) for n in nets)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.trunk(x)
        return [head(h) for head in self.heads]


class HandDML(nn.Module):
    """DML: ``k`` whole, independent networks on the same input."""

    def __init__(self, k: int = 2, num_classes: int = 100, in_channels: int = 3) -> None:
        super().__init__()
        self.nets = nn.ModuleList(resnet32(num_classes, in_channels) for _ in range(k))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [net(x) for net in self.nets]
