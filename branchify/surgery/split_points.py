"""Listing where a model can be cut."""
from __future__ import annotations

import copy

import torch.fx as fx
from torch import nn

from ..spec import INPUT
from .partition import list_split_points
from .tracing import trace


def split_points(model: nn.Module, tracer: fx.Tracer | None = None, max_depth: int | None = None) -> list[str]:
    """Module paths that are valid split points, in execution order.

    ``"<input>"`` (no trunk) comes first. ``max_depth`` keeps only paths with at most that many
    dots + 1 components (``max_depth=1`` gives the top-level stages). A copy of the model is traced
    as :func:`branchify.branchify` would trace it (its plugin's tracer when ``tracer`` is not given),
    so nothing is left behind in ``model``.

    Examples:
        >>> split_points(torchvision.models.resnet18(), max_depth=1)      # doctest: +SKIP
        ['<input>', 'conv1', 'bn1', 'relu', 'maxpool', 'layer1', ..., 'layer4', 'avgpool', 'fc']
    """
    work = copy.deepcopy(model)  # tracing can leave state behind (modules caching tensors in forward)
    points = list_split_points(trace(work, tracer))
    if max_depth is not None:
        points = [p for p in points if p == INPUT or p.count(".") < max_depth]
    return points
