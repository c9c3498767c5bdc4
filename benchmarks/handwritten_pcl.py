"""PCL written by hand in plain PyTorch: the tree, the peer-ensemble classifier, the temporal mean, the loss.

What a researcher writes from the PCL reproduction
(``shaoeric/Peer-Collaborative-Learning-for-Online-Knowledge-Distillation@6afb473``) without
branchify: a shared stem + layer1 + layer2 that runs once per peer view, ``k`` layer3 + classifier
heads, ``en_fc`` on the concatenated pooled peer features (``src/models/resnet.py`` lines 154-161,
207-229), a separate "mean model" holding the EMA of every weight, updated after each optimiser
step (``src/utils/ema.py`` lines 3-7, ``src/trainer.py`` line 111) and run in training mode on the
same views, and the loss of ``src/losses/loss_wrapper.py`` lines 37-61.

``tests/integration/test_handwritten_pcl.py`` checks ``bf.method("pcl")`` against it step by step.

Examples:
    >>> from branchify.recipes.zoo import CifarResNet
    >>> hand = HandPCL(3, net_fn=lambda: CifarResNet(8, num_classes=10, in_channels=1))
    >>> logits, en = hand([torch.zeros(2, 1, 14, 14)] * 3)
    >>> len(logits), tuple(en.shape)
    (3, (2, 10))
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.handwritten import NetFn, _head, _resnet32_fn, _stem


class HandPCL(nn.Module):
    """PCL's network: peer ``k`` (and the shared trunk) on view ``k``; ``en_fc`` on the concatenated features."""

    def __init__(self, k: int = 3, num_classes: int = 100, in_channels: int = 3, *,
                 net_fn: NetFn | None = None) -> None:
        super().__init__()
        net_fn = net_fn or _resnet32_fn(num_classes, in_channels)
        nets = [net_fn() for _ in range(k)]
        self.trunk = nn.Sequential(*_stem(nets[0]), nets[0].layer2)
        self.heads = nn.ModuleList(_head(n) for n in nets)
        width = nets[0].fc.in_features
        self.en_fc = nn.Linear(k * width, nets[0].fc.out_features)

    def forward(self, views: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        logits, feats = [], []
        for head, x in zip(self.heads, views):
            f = head[2](head[1](head[0](self.trunk(x))))  # layer3 -> avgpool -> flatten
            feats.append(f)
            logits.append(head[3](f))
        return logits, self.en_fc(torch.cat(feats, dim=1))


class MeanModel:
    """The temporal mean: a copy of the network whose weights follow ``min(1 - 1/(n+1), decay)``-EMA."""

    def __init__(self, model: HandPCL, decay: float = 0.999) -> None:
        self.net = copy.deepcopy(model)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.decay, self.step = decay, 0

    @torch.no_grad()
    def update(self, model: HandPCL) -> None:
        a = min(1 - 1 / (self.step + 1), self.decay)
        for e, p in zip(self.net.parameters(), model.parameters()):
            e.mul_(a).add_(p, alpha=1 - a)
        self.step += 1

    @torch.no_grad()
    def __call__(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.net(views)[0]


def ramp(epoch: float, total: int, reference_epochs: int = 300) -> float:
    """``loss_wrapper.py`` lines 18-22 (``1`` past 80 epochs, else ``exp(-5 (1 - e/1)^2)``) scaled to the run."""
    e = epoch * reference_epochs / total
    return 1.0 if e > 80 else math.exp(-5 * (1 - e) ** 2)


def _kd(pred: torch.Tensor, target: torch.Tensor, T: float) -> torch.Tensor:
    return F.kl_div(F.log_softmax(pred / T, 1), F.softmax(target / T, 1), reduction="batchmean") * T * T


def pcl_loss(logits: list[torch.Tensor], en: torch.Tensor, means: list[torch.Tensor], y: torch.Tensor,
             w: float, T: float = 3.0) -> torch.Tensor:
    """``CE(en) + sum_k [CE(z_k) + w KD(en -> z_k) + w mean_{j != k} KD(mean_j -> z_k)]`` (teachers constant)."""
    loss = F.cross_entropy(en, y)
    for k, z in enumerate(logits):
        pm = sum(_kd(z, means[j].detach(), T) for j in range(len(logits)) if j != k) / (len(logits) - 1)
        loss = loss + F.cross_entropy(z, y) + w * _kd(z, en.detach(), T) + w * pm
    return loss
