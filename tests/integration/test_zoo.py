"""Tests for the recipes' model zoo: shapes, fx tracing, parameter counts, registry errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from branchify.recipes.zoo import MODELS, CifarResNet, DenseNet, WideResNet, build_model, count_parameters

# (in_channels, image size, classes): Fashion-MNIST and CIFAR-100 shaped inputs.
CONFIGS = [(1, 28, 10), (3, 32, 100)]

# Documented CIFAR-100 parameter counts (module docstrings and recipes/zoo/__init__.py).
DOCUMENTED_CIFAR100_PARAMS = {
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet110": 1_736_564,
    "vgg16": 14_770_212,
    "wrn_20_8": 6_870_324,
    "densenet40_12": 1_060_132,
    "mobilenetv2_0.5": 815_780,
}


@pytest.mark.parametrize("in_channels,size,num_classes", CONFIGS, ids=["fmnist", "cifar100"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_builds_forwards_and_traces_exactly(name, in_channels, size, num_classes):
    torch.manual_seed(0)
    model = build_model(name, num_classes=num_classes, in_channels=in_channels).eval()
    assert isinstance(model.fc, nn.Linear) and model.fc.out_features == num_classes
    for stage in ("layer1", "layer2", "layer3"):
        assert isinstance(getattr(model, stage), nn.Sequential), f"{name}.{stage} is not a stage"

    x = torch.randn(2, in_channels, size, size)
    with torch.no_grad():
        out = model(x)
        traced = torch.fx.symbolic_trace(model)
        traced_out = traced(x)
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()
    assert torch.equal(out, traced_out), f"{name}: traced graph does not reproduce eval outputs"
    # The classifier is the last module called, so a tool can find and replace it by name.
    called = [node.target for node in traced.graph.nodes if node.op == "call_module"]
    assert called[-1] == "fc"


def test_documented_parameter_counts():
    counts = {name: count_parameters(build_model(name, 100, 3)) for name in MODELS}
    assert counts == DOCUMENTED_CIFAR100_PARAMS
    # ResNet-32 on CIFAR-100 is the "0.47M" network of the papers.
    assert abs(counts["resnet32"] - 0.47e6) / 0.47e6 < 0.01
    # He et al.'s ResNet-110 has 1.7M parameters.
    assert abs(counts["resnet110"] - 1.7e6) / 1.7e6 < 0.03


def test_variants_documented_in_docstrings():
    # The reference code's "resnet110" and "densenet-40-12" variants.
    assert count_parameters(CifarResNet(110, num_classes=100, block="bottleneck")) == 1_170_868
    bc = DenseNet(40, 12, num_classes=100, bc=True)
    assert count_parameters(bc) == 188_092 and bc.fc.in_features == 132
    assert count_parameters(WideResNet(28, 10, num_classes=100, block="basic")) == 36_536_884


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError) as info:
        build_model("resnet18", num_classes=10, in_channels=3)
    message = str(info.value)
    assert "'resnet18'" in message
    for name in MODELS:
        assert name in message


@pytest.mark.parametrize(
    "factory,match",
    [
        (lambda: CifarResNet(33), "6n\\+2"),
        (lambda: CifarResNet(32, block="bottleneck"), "9n\\+2"),
        (lambda: CifarResNet(20, block="wide"), "basic"),
        (lambda: WideResNet(20, 8, block="basic"), "6n\\+4"),
        (lambda: DenseNet(41, 12), "3n\\+4"),
    ],
)
def test_bad_depth_or_block_is_rejected(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_resnet_blocks_after_the_first_preserve_shape_and_can_be_appended():
    model = build_model("resnet32", num_classes=10, in_channels=3).eval()
    x = torch.randn(1, 16, 32, 32)
    with torch.no_grad():
        for stage_name in ("layer1", "layer2", "layer3"):
            stage = getattr(model, stage_name)
            x = stage[0](x)
            for block in list(stage)[1:]:
                assert block(x).shape == x.shape
            for block in list(stage)[1:]:
                x = block(x)
        model.layer3.append(copy.deepcopy(model.layer3[-1]))
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
