"""CIFAR-style model zoo for the online-KD recipes.

Every model is a plain ``nn.Module`` that traces with ``torch.fx.symbolic_trace``, takes
``num_classes`` and ``in_channels`` (3x32x32 CIFAR or 1x28x28 Fashion-MNIST both work: the head
uses ``AdaptiveAvgPool2d(1)``), groups its body into ``nn.Sequential`` stages ``layer1``,
``layer2``, ... and ends with an ``nn.Linear`` named ``fc``.

Parameter counts on CIFAR-100 (3 channels, 100 classes):

============== ============ =====================================================
name           parameters   setting
============== ============ =====================================================
resnet20          278,324   ResNet-20 (the CPU demo)
resnet32          472,756   ResNet-32 (DML, ONE, CL-ILR, OKDDip, PCL)
resnet110       1,736,564   ResNet-110, He et al.'s BasicBlock n=18
vgg16          14,770,212   VGG-16 with BN, single linear classifier (OKDDip, PCL)
wrn_20_8        6,870,324   WRN-20-8 as built by the OKDDip/PCL code (bottleneck)
densenet40_12   1,060,132   DenseNet-40 (k=12), BC-free
mobilenetv2_0.5   815,780   MobileNetV2 x0.5, CIFAR strides
============== ============ =====================================================
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ._common import count_parameters, init_weights
from .densenet import DenseNet, densenet40_12
from .mobilenetv2 import MobileNetV2, mobilenetv2
from .resnet import CifarResNet, resnet20, resnet32, resnet110
from .vgg import VGG, vgg16
from .wrn import WideResNet, wrn, wrn_20_8

#: Registry of the recipes' models; every factory takes ``num_classes`` and ``in_channels``.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet110": resnet110,
    "vgg16": vgg16,
    "wrn_20_8": wrn_20_8,
    "densenet40_12": densenet40_12,
    "mobilenetv2_0.5": mobilenetv2,  # width_mult defaults to 0.5
}


def build_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """Build the registry model ``name`` for ``num_classes`` classes and ``in_channels`` channels.

    Raises:
        ValueError: if ``name`` is not a key of :data:`MODELS`; the message lists the valid names.

    Examples:
        >>> import torch
        >>> net = build_model("resnet32", num_classes=10, in_channels=1)
        >>> net(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    try:
        factory = MODELS[name]
    except KeyError:
        valid = ", ".join(sorted(MODELS))
        raise ValueError(f"unknown model {name!r}; valid names are: {valid}") from None
    return factory(num_classes=num_classes, in_channels=in_channels)


__all__ = [
    "MODELS",
    "CifarResNet",
    "DenseNet",
    "MobileNetV2",
    "VGG",
    "WideResNet",
    "build_model",
    "count_parameters",
    "densenet40_12",
    "init_weights",
    "mobilenetv2",
    "resnet110",
    "resnet20",
    "resnet32",
    "vgg16",
    "wrn",
    "wrn_20_8",
]
