"""Small building blocks shared by the zoo families."""

from __future__ import annotations

import torch
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


class PreActNet(nn.Module):
    """The closing of the pre-activation families (DenseNet, Wide ResNet), written once.

    Their stages end in an un-normalised tensor (a residual sum, a dense concatenation), so the
    net closes with one more BN-ReLU before pooling: ``conv1`` -> ``layer1``/``layer2``/``layer3``
    -> ``bn``/``relu`` -> ``avgpool`` -> ``flatten`` -> ``fc``.  A subclass registers ``conv1``
    and the three stages, then calls :meth:`_add_head`, which registers the closing modules after
    them (so ``state_dict`` keys, the ``torch.fx`` node names and the order :func:`init_weights`
    draws random numbers in follow the layout) and initialises the whole net.

    Examples:
        >>> class Tiny(PreActNet):
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.conv1 = conv3x3(1, 4)
        ...         self.layer1, self.layer2, self.layer3 = nn.Identity(), nn.Identity(), nn.Identity()
        ...         self._add_head(4, num_classes=3)
        >>> Tiny()(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 3])
        >>> [name for name, _ in Tiny().named_children()][-5:]
        ['bn', 'relu', 'avgpool', 'flatten', 'fc']
    """

    def _add_head(self, channels: int, num_classes: int) -> None:
        """Register ``bn``, ``relu``, ``avgpool``, ``flatten`` and ``fc``, then :func:`init_weights`."""
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu(self.bn(x))
        return self.fc(self.flatten(self.avgpool(x)))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters of ``model`` (the figure papers report).

    Examples:
        >>> count_parameters(nn.Linear(64, 100))
        6500
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
