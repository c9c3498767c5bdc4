"""Small separate networks for the Cohort / MD / distributed tests, and the step they share.

A plain module (``from peer_models import SmallCNN``), so worker processes that import a test
module build exactly the same peers.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Conv -> BN -> ReLU -> global mean -> fc, for 1-channel images."""

    def __init__(self, classes: int = 4, width: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


class SmallMLP(nn.Module):
    """Flatten -> Linear -> ReLU -> Dropout -> fc, for 1x8x8 images (draws dropout masks)."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.ReLU(), nn.Dropout(0.3))
        self.fc = nn.Linear(12, classes)

    def forward(self, x):
        return self.fc(self.body(x))


def step_all(loss: torch.Tensor, optimizers: Iterable[torch.optim.Optimizer]) -> float:
    """One update with per-peer optimisers: zero every one, backward once, step every one."""
    optimizers = list(optimizers)
    for o in optimizers:
        o.zero_grad()
    loss.backward()
    for o in optimizers:
        o.step()
    return float(loss.detach())
