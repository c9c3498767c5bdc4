from __future__ import annotations

import torch
from torchvision import models as tvm

import branchify as bf
from toy_models import Stages, ToyResidual


def test_split_points_are_in_execution_order():
    names = bf.split_points(tvm.resnet18(), max_depth=1)
    assert names == ["<input>", "conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3",
                     "layer4", "avgpool", "fc"]


def test_every_listed_split_point_is_accepted():
    toy_residual = ToyResidual()
    points = bf.split_points(toy_residual)
    assert "block.conv2" in points
    for p in points:
        bm = bf.branchify(toy_residual, bf.Spec(splits=[p], fanout=[2]))
        assert len(bm(torch.randn(1, 3, 8, 8)).logits) == 2


def test_grad_scale_rescales_the_gradient_into_the_trunk():
    stages = _stages()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    plain = bf.branchify(stages, bf.Spec(splits=["layer2"], fanout=[4], init="copy"))
    scaled = bf.branchify(stages, bf.Spec(splits=["layer2"], fanout=[4], init="copy",
                                          grad_scale={"layer2": 0.25}))
    for bm in (plain, scaled):
        torch.stack(bm(x).logits).sum().backward()
    g_plain = plain.segments["trunk"].conv1.weight.grad
    g_scaled = scaled.segments["trunk"].conv1.weight.grad
    torch.testing.assert_close(g_scaled, 0.25 * g_plain, rtol=1e-5, atol=1e-7)
    # the branches themselves are not rescaled
    torch.testing.assert_close(scaled.segments["b1"].fc.weight.grad, plain.segments["b1"].fc.weight.grad)


def _stages() -> Stages:
    torch.manual_seed(0)
    return Stages()
