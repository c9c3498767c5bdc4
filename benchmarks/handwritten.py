"""Hand-written multi-branch CIFAR ResNet trees and losses: what a researcher writes without branchify.

Each tree builds its branches by instantiating fresh networks (``net_fn()``, the architecture's
own random init) and wiring their stages by hand, as the authors' code does: shared stem and
early stages, re-instantiated later stages. ``forward`` returns the list of leaf logits in
branchify's leaf order (depth-first, child 0 first); ``forward_tree`` also returns the shared
activation at the cut (ONE's gate reads it).

The losses are written from the papers and the authors' code in plain PyTorch, independently of
branchify, so that ``tests/integration/test_handwritten_equivalence.py`` and the CPU accuracy
benchmark can compare the two implementations like for like.

Example:
    >>> from branchify.recipes.zoo import CifarResNet
    >>> tree = HandTSA(net_fn=lambda: CifarResNet(8, num_classes=10, in_channels=1))
    >>> [z.shape for z in tree(torch.zeros(2, 1, 14, 14))]
    [torch.Size([2, 10]), torch.Size([2, 10]), torch.Size([2, 10]), torch.Size([2, 10])]
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from branchify.recipes.zoo import resnet32

NetFn = Callable[[], nn.Module]


def _resnet32_fn(num_classes: int, in_channels: int) -> NetFn:
    return lambda: resnet32(num_classes, in_channels)


def _stem(net: nn.Module) -> list[nn.Module]:
    return [net.conv1, net.bn1, net.relu, net.layer1]


def _head(net: nn.Module) -> nn.Sequential:
    return nn.Sequential(net.layer3, net.avgpool, net.flatten, net.fc)


class HandBaseline(nn.Module):
    """The plain network, returning ``[logits]`` like the trees (one leaf)."""

    def __init__(self, net_fn: NetFn) -> None:
        super().__init__()
        self.net = net_fn()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.net(x)]


class HandONE(nn.Module):
    """ONE's tree: shared stem + layer1 + layer2, ``k`` independent layer3 + classifier heads.

    ``gate`` is ONE's gate without its softmax: ``Linear(C_trunk -> k) -> BatchNorm1d(k) -> ReLU``
    on the globally pooled trunk output (ONE's ``control_v1``/``bn_v1``); ``gate=False`` leaves it
    out (the speed benchmarks time the tree alone).
    """

    def __init__(self, k: int = 3, num_classes: int = 100, in_channels: int = 3, *,
                 net_fn: NetFn | None = None, gate: bool = True) -> None:
        super().__init__()
        net_fn = net_fn or _resnet32_fn(num_classes, in_channels)
        nets = [net_fn() for _ in range(k)]
        self.trunk = nn.Sequential(*_stem(nets[0]), nets[0].layer2)
        self.heads = nn.ModuleList(_head(n) for n in nets)
        width = nets[0].layer3[0].conv1.in_channels
        self.gate = nn.Sequential(nn.Linear(width, k), nn.BatchNorm1d(k), nn.ReLU()) if gate else None

    def forward_tree(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        h = self.trunk(x)
        return [head(h) for head in self.heads], h

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_tree(x)[0]


class HandTSA(nn.Module):
    """TSA-M-2 on a 3-stage net: shared stem + layer1; ``m`` layer2 branches, each with ``m``
    layer3 leaves (``m * m`` leaves, TSA-2-3 for ``m = 2``)."""

    def __init__(self, num_classes: int = 100, in_channels: int = 3, m: int = 2, *,
                 net_fn: NetFn | None = None) -> None:
        super().__init__()
        net_fn = net_fn or _resnet32_fn(num_classes, in_channels)
        nets = [net_fn() for _ in range(m * m)]
        self.trunk = nn.Sequential(*_stem(nets[0]))
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
    """AHBF's tree: shared stem + layer1 + layer2; leaf m's layer3 has ``a * m`` extra blocks."""

    def __init__(self, k: int = 4, a: int = 4, num_classes: int = 100, in_channels: int = 3, *,
                 net_fn: NetFn | None = None) -> None:
        super().__init__()
        net_fn = net_fn or _resnet32_fn(num_classes, in_channels)
        nets = [net_fn() for _ in range(k)]
        self.trunk = nn.Sequential(*_stem(nets[0]), nets[0].layer2)
        for m, net in enumerate(nets):
            last = net.layer3[-1]
            width = last.bn2.num_features  # the stage's output width (extra blocks keep it)
            for _ in range(a * m):
                net.layer3.append(type(last)(width, width, 1))
        self.heads = nn.ModuleList(_head(n) for n in nets)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.trunk(x)
        return [head(h) for head in self.heads]


class HandDML(nn.Module):
    """DML: ``k`` whole, independent networks on the same input."""

    def __init__(self, k: int = 2, num_classes: int = 100, in_channels: int = 3, *,
                 net_fn: NetFn | None = None) -> None:
        super().__init__()
        net_fn = net_fn or _resnet32_fn(num_classes, in_channels)
        self.nets = nn.ModuleList(net_fn() for _ in range(k))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [net(x) for net in self.nets]


# ---------------------------------------------------------------------- losses
def _kl(teacher: torch.Tensor, student: torch.Tensor, T: float) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``, batchmean (the authors' ``KL_Loss`` without
    its 1e-7 guard)."""
    return T * T * F.kl_div(F.log_softmax(student / T, 1), F.log_softmax(teacher / T, 1),
                            reduction="batchmean", log_target=True)


def one_loss(logits: list[torch.Tensor], trunk: torch.Tensor, gate: nn.Module, y: torch.Tensor,
             T: float = 3.0, ramp: float = 1.0) -> torch.Tensor:
    """ONE (official code, ``cifar_one.py``): ``sum_k CE(z_k) + CE(z_e) + ramp * sum_k T^2 KL(p_e || p_k)``
    with ``z_e = sum_k g_k z_k``, ``g = softmax(gate(GAP(trunk)))`` and ``p_e`` detached."""
    g = F.softmax(gate(trunk.mean(dim=(2, 3))), dim=1)
    z_e = sum(g[:, k : k + 1] * z for k, z in enumerate(logits))
    ce = sum(F.cross_entropy(z, y) for z in logits) + F.cross_entropy(z_e, y)
    return ce + ramp * sum(_kl(z_e.detach(), z, T) for z in logits)


def pairwise_loss(logits: list[torch.Tensor], y: torch.Tensor, T: float, alpha: float | None = None) -> torch.Tensor:
    """DML / TSA: ``sum_k [c_ce CE(z_k) + c_kd T^2 / (K-1) sum_{j != k} KL(p_j || p_k)]``, peers
    detached; ``alpha=None`` is DML (``c_ce = c_kd = 1``), else TSA (``1 - alpha``, ``alpha``)."""
    c_ce, c_kd = (1.0, 1.0) if alpha is None else (1.0 - alpha, alpha)
    k = len(logits)
    total = logits[0].new_zeros(())
    for i, z in enumerate(logits):
        kd = sum(_kl(logits[j].detach(), z, T) for j in range(k) if j != i) / (k - 1)
        total = total + c_ce * F.cross_entropy(z, y) + c_kd * kd
    return total
