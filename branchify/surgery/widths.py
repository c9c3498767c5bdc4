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


def _flattens_to_rows(node: fx.Node) -> bool:
    """``x.flatten(1)`` / ``x.view(B, -1)``: the pool-then-flatten idiom, which keeps a pooled map's channels."""
    rest = node.args[1:]
    if node.target in ("flatten", torch.flatten):
        start = node.kwargs.get("start_dim", rest[0] if rest else 0)
        return start == 1 and node.kwargs.get("end_dim", rest[1] if len(rest) > 1 else -1) == -1
    sizes = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
    return len(sizes) == 2 and sizes[1] == -1


def _regroups(node: fx.Node) -> bool:
    """A reshape that may move values between the channel dim and the others (timm Swin's patch merging
    ``reshape(B, H/2, 2, W/2, 2, C).permute(...).flatten(3)`` makes ``4C`` channels of ``C``)."""
    method = node.op == "call_method" and node.target in ("reshape", "view", "flatten", "unflatten")
    function = node.op == "call_function" and node.target in (torch.reshape, torch.flatten, torch.unflatten)
    return (method or function) and not _flattens_to_rows(node)


def _sized_consumer(gm: fx.GraphModule, name: str) -> tuple[int, fx.Node, fx.Node | None] | None:
    """``(width, layer node, first regrouping reshape on the way or None)`` of the first sized layer
    reading ``name`` (breadth first), or ``None``."""
    start = next((n for n in gm.graph.nodes if n.name == name), None)
    if start is None:
        return None
    queue, seen = deque([(start, None)]), {start}
    while queue:
        node, crossed = queue.popleft()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            width = None
            if user.op == "call_module":
                width = module_width(gm.get_submodule(str(user.target)))
            elif user.op == "call_function":
                width = _function_width(gm, user)
                if width is None and user.target in _MERGES and \
                        len([a for a in user.all_input_nodes if a.op != "get_attr"]) > 1:
                    continue  # beyond a merge the width may be another value's
            if width is not None:
                return width, user, crossed
            if user.op != "output":
                queue.append((user, crossed or (user if _regroups(user) else None)))
    return None


def consumer_width(gm: fx.GraphModule, name: str) -> int | None:
    """Input width of the first sized layer reading the value ``name`` in ``gm``; ``None`` if unknown."""
    found = _sized_consumer(gm, name)
    return None if found is None else found[0]


def regrouped_width(gm: fx.GraphModule, name: str) -> tuple[int, str, str] | None:
    """``(width, layer, reshape)`` when the first sized layer reading ``name`` reads it through a reshape
    that may regroup its channels (so that layer's width need not be the value's); else ``None``.

    Examples:
        >>> class Merge(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.norm = nn.LayerNorm(16)
        ...     def forward(self, x):  # [B, H, W, C] -> [B, H/2, W/2, 4C]
        ...         b, h, w, c = x.shape
        ...         return self.norm(x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3))
        >>> regrouped_width(fx.symbolic_trace(Merge()), "x")
        (16, 'norm', 'reshape')
        >>> regrouped_width(fx.symbolic_trace(nn.Sequential(nn.Flatten(), nn.Linear(4, 2))), "input_1") is None
        True
    """
    found = _sized_consumer(gm, name)
    if found is None or found[2] is None:
        return None
    width, layer, crossed = found
    return width, str(layer.target) if layer.op == "call_module" else layer.name, crossed.name


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
