"""How wide a value in a traced graph is, read from the layers that consume it (no forward needed).

Aggregators are sized from the model (ONE's gate reads the activation at the cut). The width of a
value is the input width of the first layer that reads it, looking through the parameter-free
operations between them (a permute before a LayerNorm, a one-tensor concatenation before a
BatchNorm, an activation) - for modules (``nn.Conv2d.in_channels``, ``nn.LayerNorm``...) and for
functional calls that take weights (``F.layer_norm``'s normalized shape, ``F.conv2d`` / ``F.linear``
weights read with ``get_attr``).
"""
from __future__ import annotations

import operator
from collections import deque

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

_MERGES = {torch.cat, torch.concat, torch.stack, operator.add, torch.add, operator.mul, torch.mul}
"""Ops with several inputs: a width found beyond one of them is the width of the merge, not of the value."""


def module_width(m: nn.Module) -> int | None:
    """Channels/features a layer reads, for the layer types that say so (searching inside blocks).

    Examples:
        >>> module_width(nn.Sequential(nn.ReLU(), nn.Conv2d(8, 4, 1)))
        8
    """
    for sub in m.modules():
        for attr in ("in_channels", "in_features", "num_features", "embed_dim"):
            if isinstance(getattr(sub, attr, None), int):
                return getattr(sub, attr)
        if isinstance(sub, nn.LayerNorm):
            return sub.normalized_shape[-1]
        if isinstance(sub, nn.GroupNorm):
            return sub.num_channels
    return None


def _attr(gm: fx.GraphModule, node) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = gm
        for part in str(node.target).split("."):
            value = getattr(value, part, None)
        return value if isinstance(value, torch.Tensor) else None
    return None


def _function_width(gm: fx.GraphModule, node: fx.Node) -> int | None:
    if node.target in (F.layer_norm, torch.layer_norm):
        shape = node.kwargs.get("normalized_shape", node.args[1] if len(node.args) > 1 else None)
        return int(shape[-1]) if isinstance(shape, (tuple, list)) and shape else None
    if node.target in (F.conv1d, F.conv2d, F.conv3d, F.linear, F.batch_norm, F.group_norm):
        weight = _attr(gm, node.kwargs.get("weight", node.args[1] if len(node.args) > 1 else None))
        if weight is None:
            return None
        if node.target in (F.batch_norm, F.group_norm) or weight.dim() == 1:
            return int(weight.shape[0])
        groups = node.kwargs.get("groups", node.args[6] if len(node.args) > 6 else 1)
        return int(weight.shape[1]) * (groups if isinstance(groups, int) else 1)
    return None


def consumer_width(gm: fx.GraphModule, name: str) -> int | None:
    """Input width of the first sized layer reading the value ``name`` in ``gm``; ``None`` if unknown."""
    start = next((n for n in gm.graph.nodes if n.name == name), None)
    if start is None:
        return None
    queue, seen = deque([start]), {start}
    while queue:
        node = queue.popleft()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            if user.op == "call_module":
                width = module_width(gm.get_submodule(str(user.target)))
                if width is not None:
                    return width
            elif user.op == "call_function":
                width = _function_width(gm, user)
                if width is not None:
                    return width
                if user.target in _MERGES and len([a for a in user.all_input_nodes if a.op != "get_attr"]) > 1:
                    continue  # beyond a merge the width may be another value's
            if user.op != "output":
                queue.append(user)
    return None


def producer_width(gm: fx.GraphModule, name: str) -> int | None:
    """Output width of the nearest sized layer that produces the value ``name`` in ``gm``, looking
    back through parameter-free operations (pooling, flatten, activations); ``None`` if unknown.

    Examples:
        >>> gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 7, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1)))
        >>> producer_width(gm, "_2")
        7
    """
    start = next((n for n in gm.graph.nodes if n.name == name), None)
    queue, seen = deque([start] if start is not None else []), set()
    while queue:
        node = queue.popleft()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module":
            m = gm.get_submodule(str(node.target))
            for attr in ("out_features", "out_channels"):
                if isinstance(getattr(m, attr, None), int):
                    return getattr(m, attr)
        elif node.op == "call_function" and node.target in (F.linear, F.conv1d, F.conv2d, F.conv3d):
            weight = _attr(gm, node.kwargs.get("weight", node.args[1] if len(node.args) > 1 else None))
            if weight is not None:
                return int(weight.shape[0])
        queue.extend(a for a in node.all_input_nodes if a.op not in ("get_attr", "placeholder"))
    return None
