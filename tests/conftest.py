"""Shared fixtures: a one-thread fixture, a fake branched model, synthetic outputs, a tiny CIFAR-style
ResNet, and *independent* reference formulas (plain torch ops, never the library's helpers) that the
library is checked against. Unit tests (``tests/unit``) use only these and the core; integration
tests (``tests/integration``) may use the recipes, the integrations and real data."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from branchify.contract import LeafModel
from branchify.outputs import BranchedOutput
from branchify.spec import Spec


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: with tiny models OpenMP threads only add barrier waits
    (milliseconds per op on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class FakeBranched(LeafModel):
    """Stands in for a BranchedModel: the metadata aggregators bind to, and the contract's
    aggregator slot. Its "forward" takes a synthetic :class:`BranchedOutput` and returns it with
    the attached aggregator's targets, exactly what a real model's forward adds."""

    def __init__(self, num_leaves: int = 3, channels: int = 8, feature_dim: int = 16,
                 feature_map_channels: int | None = 8, target: int = 0) -> None:
        super().__init__()
        self.spec = Spec(splits=["stage"], fanout=[num_leaves], target=target)
        self.leaf_paths = self.spec.leaf_paths()
        self.weight = nn.Parameter(torch.zeros(1))
        self._channels = channels
        self._feature_dim = feature_dim
        self._feature_map_channels = feature_map_channels

    @property
    def feature_dim(self) -> int | None:
        return self._feature_dim

    @property
    def feature_map_channels(self) -> int | None:
        return self._feature_map_channels

    def cut_channels(self, path: tuple[int, ...] = ()) -> int | None:
        return self._channels

    def forward_leaves(self, out: BranchedOutput) -> BranchedOutput:
        return out

    def export(self, leaf: int | None = None) -> nn.Module:
        raise NotImplementedError("a fake model has nothing to export")


def make_output(k: int = 3, b: int = 6, classes: int = 5, channels: int = 8, feat: int = 16, hw: int = 2,
                seed: int = 0, scale: float = 3.0, tokens: int | None = None) -> BranchedOutput:
    """Synthetic BranchedOutput whose tensors are grad-requiring leaves (so tests can read .grad)."""
    g = torch.Generator().manual_seed(seed)
    pos = (b,) if tokens is None else (b, tokens)

    def leaf(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).requires_grad_(True)

    return BranchedOutput(
        logits=[leaf(*pos, classes, s=scale) for _ in range(k)],
        features=[leaf(*pos, feat) for _ in range(k)],
        feature_maps=[leaf(b, feat, hw, hw) for _ in range(k)],
        cuts={(): leaf(b, channels, 4, 4)},
        leaf_paths=[(i,) for i in range(k)],
    )


class Reference:
    """The formulas of docs/methods/*.md written out with plain torch ops."""

    @staticmethod
    def kl(teacher_logits, student_logits, T):
        p_t = torch.softmax(teacher_logits / T, dim=-1)
        log_p_s = torch.log_softmax(student_logits / T, dim=-1)
        return T * T * (p_t * (torch.log(p_t) - log_p_s)).sum(-1).mean()

    @staticmethod
    def kl_probs(p_t, student_logits, T):
        log_p_s = torch.log_softmax(student_logits / T, dim=-1)
        return T * T * (p_t * (torch.log(p_t) - log_p_s)).sum(-1).mean()

    @staticmethod
    def ce(logits, y):
        return -torch.log_softmax(logits, dim=-1).gather(-1, y.unsqueeze(-1)).mean()

    @staticmethod
    def ramp(e, length):
        return math.exp(-5.0 * (1.0 - e / length) ** 2) if e < length else 1.0

    @staticmethod
    def bn_train(x, bn):
        """BatchNorm in training mode over dim 0 (and spatial dims for 4-D), from its parameters."""
        dims = (0,) if x.dim() == 2 else (0, 2, 3)
        shape = (1, -1) if x.dim() == 2 else (1, -1, 1, 1)
        mu = x.mean(dim=dims, keepdim=True)
        var = ((x - mu) ** 2).mean(dim=dims, keepdim=True)
        return (x - mu) / torch.sqrt(var + bn.eps) * bn.weight.view(shape) + bn.bias.view(shape)


@pytest.fixture
def ref() -> Reference:
    return Reference()


@pytest.fixture
def fake_model():
    return FakeBranched


@pytest.fixture
def output():
    return make_output


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyCifarResNet(nn.Module):
    """A CIFAR-style ResNet (layer1..layer3, no layer4) small enough for 30 CPU steps in a test.

    layer3 has three blocks so its last block repeats the one before (AHBF can append copies).
    """

    def __init__(self, num_classes: int = 5, width: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(_Block(width, width, 1))
        self.layer2 = nn.Sequential(_Block(width, 2 * width, 2))
        self.layer3 = nn.Sequential(_Block(2 * width, 4 * width, 2), _Block(4 * width, 4 * width, 1),
                                    _Block(4 * width, 4 * width, 1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@pytest.fixture
def tiny_resnet():
    return TinyCifarResNet
