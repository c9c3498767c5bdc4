"""The one tree runner: every forward of a branched model goes through :func:`run_tree`.

The tree runs level by level. Each level's replicas are the units of a
:class:`~branchify.surgery.batched.BatchPlan`: a group of structurally identical siblings runs as
one vmapped call when batching is on, and one call per replica otherwise (a loop is the same
walk with every group taken apart), so gradient rescaling at a cut, the values a later level
reads, and the collection of heads and cuts are written once for both forms.

What the runner needs about a tree is a :class:`TreeLayout` (plain data built by
:func:`branchify.branchify`): which graph values enter each level, which is the cut, and which
values are a leaf's logits, features and feature map.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from ..autograd import scale_grad
from ..tree import TRUNK_KEY, TreePath, segment_key
from .batched import BatchPlan, NotBatchable, ReplicaGroup, group_forward


class Heads(NamedTuple):
    """The fx value names a leaf's outputs are read from.

    Attributes:
        logits: the leaf's logits (the traced model's output).
        features: the pooled features (the final Linear's input), ``None`` if not found.
        feature_map: the last spatial feature map, ``None`` if not found.

    Examples:
        >>> Heads("fc", "flatten", "layer4").features
        'flatten'
    """

    logits: str
    features: str | None
    feature_map: str | None


@dataclass(frozen=True)
class TreeLayout:
    """How values flow through a cut model (all names are fx node names of the traced graph).

    Attributes:
        level_inputs: per level (0 = trunk), the values its segment takes.
        cut_names: per level >= 1, the main value entering it (index 0 unused; ``None`` if unknown).
        heads: the value names a leaf's logits, features and feature map are read from (:class:`Heads`).
        grad_scale: per replicated level (index 0 = level 1), the factor on gradients flowing back
            into its parent.
        children: tree path -> child paths, in order.
        leaf_paths: leaf paths in leaf order.
    """

    level_inputs: list[list[str]]
    cut_names: list[str | None]
    heads: Heads
    grad_scale: list[float]
    children: dict[TreePath, list[TreePath]]
    leaf_paths: list[TreePath]


@dataclass
class TreeResult:
    """The pieces of a branched forward, per leaf in leaf order (cuts in depth-first order)."""

    logits: list[torch.Tensor]
    features: list[torch.Tensor | None]
    feature_maps: list[torch.Tensor | None]
    cuts: dict[TreePath, torch.Tensor]


def call_segment(seg: nn.Module, names: list[str], env: dict[str, Any], scale: float) -> dict[str, Any]:
    """Run one segment on its inputs from ``env`` (gradient into them scaled by ``scale``)."""
    if scale != 1.0:
        inputs = {n: scale_grad(env[n], scale) if isinstance(env[n], torch.Tensor) else env[n] for n in names}
    else:
        inputs = {n: env[n] for n in names}
    return {**env, **seg(**inputs)}


def _run_group(segments: nn.ModuleDict, group: ReplicaGroup, envs: dict[TreePath, dict[str, Any]],
               origin: dict[int, tuple[torch.Tensor, int]], names: list[str], scale: float, strict: bool) -> None:
    """One vmapped call for ``group``; on failure (``strict=False``) the loop, and the group is
    disabled for later calls when vmap can never run it."""
    if torch.compiler.is_compiling():  # no fallback inside a compiled graph: errors must surface
        out = group_forward(segments, group, envs, origin, names, scale)
    else:
        try:
            out = group_forward(segments, group, envs, origin, names, scale)
        except Exception as exc:
            if strict:
                raise RuntimeError(
                    f"batched=True: replicas {[segment_key(p) for p in group.members]} cannot run as one "
                    f"vmapped call ({type(exc).__name__}: {exc}); use batched='auto' (falls back to one "
                    f"call per replica) or batched=False") from exc
            # The loop tells a vmap limitation from bad inputs: with bad inputs it raises too.
            for p in group.members:
                envs[p] = call_segment(segments[segment_key(p)], names, envs[p[:-1]], scale)
            if not isinstance(exc, NotBatchable) or exc.permanent:
                group.disabled = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"replicas {[segment_key(p) for p in group.members]} run one call each from now "
                              f"on: vmap cannot run them ({group.disabled})", stacklevel=5)
            return
    for i, p in enumerate(group.members):
        own = {}
        for k, v in out.items():
            own[k] = v[i]
            origin[id(own[k])] = (v, i)
        envs[p] = {**envs[p[:-1]], **own}


def run_tree(segments: nn.ModuleDict, layout: TreeLayout, plan: BatchPlan, env: dict[str, Any], *,
             vmap: bool, strict: bool = False) -> TreeResult:
    """Run the whole tree on ``env`` (the model inputs by node name).

    Args:
        segments: one module per tree node (``trunk``, ``b0``, ``b0_1``...).
        layout: how values flow between them.
        plan: which sibling replicas form groups.
        vmap: run each enabled group as one vmapped call (else one call per replica).
        strict: with ``vmap``, raise instead of falling back to the loop when vmap fails.
    """
    envs: dict[TreePath, dict[str, Any]] = {(): call_segment(segments[TRUNK_KEY], layout.level_inputs[0], env, 1.0)}
    origin: dict[int, tuple[torch.Tensor, int]] = {}  # id(slice) -> (stacked output, index)
    for level, units in enumerate(plan.levels, start=1):
        names = layout.level_inputs[level]
        scale = layout.grad_scale[level - 1]
        for unit in units:
            if isinstance(unit, ReplicaGroup):
                if vmap and unit.disabled is None:
                    _run_group(segments, unit, envs, origin, names, scale, strict)
                    continue
                members = unit.members
            else:
                members = [unit]
            for p in members:
                envs[p] = call_segment(segments[segment_key(p)], names, envs[p[:-1]], scale)
    heads = layout.heads
    result = TreeResult([], [], [], {})
    for p in layout.leaf_paths:
        result.logits.append(envs[p][heads.logits])
        result.features.append(envs[p][heads.features] if heads.features is not None else None)
        result.feature_maps.append(envs[p][heads.feature_map] if heads.feature_map is not None else None)
    for p in sorted(envs):  # tuples sort in depth-first pre-order
        cut = layout.cut_names[len(p) + 1] if layout.children[p] else None
        if cut is not None:
            result.cuts[p] = envs[p][cut]
    return result
