"""ONE's Gate on a cut whose first reader reshapes it (timm Swin's patch merging, issue 19).

The gate is sized from the first layer reading the cut. Behind a reshape that regroups the channels
(``[B, H, W, C] -> [B, H/2, W/2, 4C]``) that layer's width is not the cut's: the build must fail
naming the cut that works, not build a gate of the wrong width that fails at the first forward.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.fx as fx
from torch import nn

import branchify as bf
from branchify.aggregators import AggregatorError
from branchify.surgery.widths import consumer_width, regrouped_width

C = 8


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(c), nn.Linear(c, 2 * c), nn.Linear(2 * c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class Merge(nn.Module):
    """Swin's patch merging: 2x2 neighbouring tokens of C channels -> one token of 4C -> 2C."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm, self.reduction = nn.LayerNorm(4 * c), nn.Linear(4 * c, 2 * c, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class Stage(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.downsample, self.blocks = Merge(c), nn.Sequential(Block(2 * c), Block(2 * c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class TinySwin(nn.Module):
    """Channels-last tokens [B, H, W, C]; the last stage starts with a patch merging."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, C, 2, stride=2)
        self.stage0 = nn.Sequential(Block(C), Block(C))
        self.stage1 = Stage(C)
        self.head = nn.Linear(2 * C, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage1(self.stage0(self.stem(x).permute(0, 2, 3, 1)))
        return self.head(x.mean(dim=(1, 2)))


def _one(net: nn.Module, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bf.method("one", net, **options)


def test_a_cut_read_through_a_regrouping_reshape_fails_at_build_naming_the_block_after_it():
    with pytest.raises(AggregatorError) as err:
        _one(TinySwin(), split="stage1")
    msg = str(err.value)
    assert "stage1.downsample.norm, 32 wide" in msg  # 4C, not the cut's C
    assert "split='stage1.blocks.0'" in msg and "Gate(channels=<C>)" in msg


def test_the_named_split_builds_a_gate_of_the_cut_width_and_trains():
    torch.manual_seed(0)
    model, okd = _one(TinySwin(), split="stage1.blocks.0")
    assert model.aggregator.fc.in_features == 2 * C
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    okd.set_epoch(1, 2)
    loss = okd(model(x), y)
    assert torch.isfinite(loss.total)
    loss.total.backward()
    assert model.aggregator.fc.weight.grad is not None


def test_the_pool_then_flatten_idiom_still_gives_the_channels():
    net = nn.Sequential(nn.Conv2d(3, 6, 1), nn.AdaptiveAvgPool2d(1))
    gm = fx.symbolic_trace(nn.Sequential(net, nn.Identity()))

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.flatten(x, 1)) + self.fc(x.view(x.shape[0], -1))

    head = fx.symbolic_trace(Head())
    assert consumer_width(head, "x") == 6 and regrouped_width(head, "x") is None
    assert consumer_width(gm, "input_1") == 3 and regrouped_width(gm, "input_1") is None


def test_a_regrouping_reshape_is_reported_with_the_width_behind_it():
    gm = fx.symbolic_trace(Merge(C))
    assert consumer_width(gm, "x") == 4 * C  # what the gate used to be sized from
    assert regrouped_width(gm, "x") == (4 * C, "norm", "reshape")
