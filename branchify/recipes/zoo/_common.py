"""Small building blocks shared by the zoo families."""

from __future__ import annotations

from torch import nn


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (a BatchNorm always follows or precedes it).

    Examples:
        >>> import torch
        >>> conv3x3(16, 32, stride=2)(torch.zeros(1, 16, 32, 32)).shape
        torch.Size([1, 32, 16, 16])
    """
    return nn.Conv2d(
        in_channels, out_channels, kernel_size=3, stride=stride, padding=1, groups=groups, bias=False
    )


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias, used for projections and bottlenecks.

    Examples:
        >>> import torch
        >>> conv1x1(16, 64)(torch.zeros(1, 16, 8, 8)).shape
        torch.Size([1, 64, 8, 8])
    """
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


def init_weights(model: nn.Module) -> None:
    """Initialise ``model`` in place the way the CIFAR ResNet authors' code does.

    Convolutions get ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``, BatchNorm layers
    weight 1 and bias 0, and Linear layers keep PyTorch's default initialisation.  Every zoo
    model uses this so that differences between families come from architecture, not init.

    Examples:
        >>> net = nn.Sequential(conv3x3(3, 8), nn.BatchNorm2d(8))
        >>> init_weights(net)
        >>> net[1].weight.detach().mean().item()
        1.0
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters of ``model`` (the figure papers report).

    Examples:
        >>> count_parameters(nn.Linear(64, 100))
        6500
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
