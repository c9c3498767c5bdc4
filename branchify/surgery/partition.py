"""Cut a traced graph at split points into one GraphModule per tree level.

A split at module path ``X`` starts a new level at the first graph node that runs inside
``X`` (the cut is at X's input). Nodes are assigned to levels in execution (graph) order, so
top-level code after a cut (``flatten``) belongs to the level it runs in. Each level becomes
its own GraphModule built by copying nodes; values produced earlier and used later (the
trunk output, a residual shortcut, an attention mask) become placeholders named after the
producing node, and each level returns a dict of the values later levels need. Parameters
are re-read locally (``get_attr`` / ``call_module``), so each level copies only its own
weights and keeps the original qualified names - which is what makes export a strict load.
"""
from __future__ import annotations

import difflib
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..spec import INPUT, SpecError
from .tracing import node_module_paths

_LINEAR_FUNCS = {F.linear, torch._C._nn.linear}
# A convolution nearer the logits than any Linear is a conv classifier (SqueezeNet, timm's DLA / DPN).
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FUNCS = {F.conv1d, F.conv2d, F.conv3d}
_POOL_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AvgPool2d,
                 nn.AdaptiveMaxPool2d)
_POOL_FUNCS = {F.adaptive_avg_pool2d, F.adaptive_avg_pool1d, F.avg_pool2d, F.adaptive_max_pool2d,
               torch.mean}
# Ops that leave features unchanged (skipped to find deterministic penultimate features) ...
_NOOP_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)
_NOOP_FUNCS = {F.dropout}
# ... and ops that only reshape (also skipped when looking for the map before pooling).
_RESHAPE_MODULES = (nn.Flatten,)
_RESHAPE_FUNCS = {torch.flatten}
_RESHAPE_METHODS = {"flatten", "view", "reshape", "squeeze", "contiguous"}


@dataclass
class Partition:
    """The traced model cut into levels (level 0 = trunk)."""

    gm: fx.GraphModule
    levels: list[fx.GraphModule]
    level_inputs: list[list[str]]
    level_outputs: list[list[str]]
    model_inputs: list[tuple[str, str, Any]]  # (node name, argument name, default or _REQUIRED)
    cut_names: list[str | None]  # per level >= 1: main value entering it (index 0 unused)
    logits_name: str
    features_name: str | None
    feature_map_name: str | None
    final_linear: nn.Module | None
    tied: dict[str, dict[int, list[str]]] = field(default_factory=dict)  # see _tied_parameters
    unexecuted: list[str] = field(default_factory=list)


class _Required:
    def __repr__(self) -> str:
        return "<required>"


REQUIRED = _Required()


def list_split_points(gm: fx.GraphModule) -> list[str]:
    """Every module path that some node runs in, in order of first execution."""
    seen: dict[str, None] = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        for p in node_module_paths(node):
            seen.setdefault(p, None)
    return [INPUT, *seen]


def _first_nodes(gm: fx.GraphModule, splits: list[str]) -> list[int]:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    firsts = []
    for s in splits:
        idx = None
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            if s == INPUT or s in node_module_paths(node):
                idx = order[node]
                break
        if idx is None:
            valid = list_split_points(gm)
            near = difflib.get_close_matches(s, valid, n=5, cutoff=0.5)
            hint = f"nearest valid names: {near}" if near else f"valid names start with {valid[:12]}"
            raise SpecError(f"unknown split {s!r}: no traced operation runs inside a module with that "
                            f"path; {hint} (branchify.split_points(model) lists all)")
        firsts.append(idx)
    for a in range(len(splits) - 1):
        if firsts[a + 1] <= firsts[a]:
            raise SpecError(f"splits out of execution order: {splits[a + 1]!r} runs before (or with) "
                            f"{splits[a]!r}; list splits in the order the model runs them, e.g. "
                            f"{sorted(splits, key=lambda s: firsts[splits.index(s)])}")
    return firsts


def _strip_pass(node: fx.Node, gm: fx.GraphModule, reshapes: bool = False) -> fx.Node:
    """Walk back over dropout / identity nodes (and, with ``reshapes``, flatten/view too)."""
    modules = _NOOP_MODULES + (_RESHAPE_MODULES if reshapes else ())
    funcs = _NOOP_FUNCS | (_RESHAPE_FUNCS if reshapes else set())
    methods = _RESHAPE_METHODS if reshapes else set()
    while True:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), modules):
            node = node.args[0]
        elif node.op == "call_function" and node.target in funcs:
            node = node.args[0]
        elif node.op == "call_method" and node.target in methods:
            node = node.args[0]
        else:
            return node


def _is_pool(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _POOL_MODULES)
    if node.op == "call_function":
        return node.target in _POOL_FUNCS
    return node.op == "call_method" and node.target == "mean"


def _find_by_name(gm: fx.GraphModule, name: str) -> fx.Node:
    nodes = {n.name: n for n in gm.graph.nodes}
    if name in nodes:
        return nodes[name]
    # A module path: the last node that runs inside it is its output.
    inside = [n for n in gm.graph.nodes if name in node_module_paths(n)]
    if inside:
        return inside[-1]
    near = difflib.get_close_matches(name, list(nodes) + list_split_points(gm), n=5)
    raise SpecError(f"feature_node {name!r} is neither an fx node name nor a module path of the "
                    f"traced model; nearest: {near}")


def _classifier_kind(node: fx.Node, gm: fx.GraphModule) -> str | None:
    """``"linear"`` or ``"conv"`` when ``node`` runs a Linear / a convolution, else ``None``."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return "linear" if isinstance(m, nn.Linear) else "conv" if isinstance(m, _CONV_MODULES) else None
    if node.op == "call_function":
        return "linear" if node.target in _LINEAR_FUNCS else "conv" if node.target in _CONV_FUNCS else None
    return None


def _nearest_classifier(logits: fx.Node, gm: fx.GraphModule) -> tuple[fx.Node | None, str | None]:
    """The Linear or convolution nearest the logits (breadth-first over the inputs), and its kind."""
    frontier, seen = [logits], set()
    while frontier:
        nxt = []
        for n in frontier:
            if n in seen:
                continue
            seen.add(n)
            kind = _classifier_kind(n, gm)
            if kind is not None:
                return n, kind
            nxt.extend(n.all_input_nodes)
        frontier = nxt
    return None, None


def find_heads(gm: fx.GraphModule, feature_node: str | None):
    """(logits node, penultimate-feature node, pre-pooling feature-map node, final Linear).

    With a conv classifier (SqueezeNet's 1x1 convolution) there are no flat penultimate features
    unless ``feature_node`` names them; the feature map is then the map that convolution reads.
    """
    out = next(n for n in gm.graph.nodes if n.op == "output")
    logits = out.args[0]
    if (isinstance(logits, fx.Node) and logits.op == "call_function" and isinstance(logits.target, type)
            and issubclass(logits.target, tuple) and logits.args and isinstance(logits.args[0], fx.Node)):
        # A training-mode named tuple whose first field is the logits (torchvision GoogLeNet's
        # GoogLeNetOutputs(logits, aux2, aux1)): the leaves are that field; the auxiliary heads are
        # not part of the tree (export keeps their weights, see partition's unexecuted state).
        logits = logits.args[0]
    if not isinstance(logits, fx.Node):
        raise SpecError(f"the traced model returns {type(logits).__name__} ({logits!r:.80}), not one "
                        f"logits tensor; wrap the model so forward returns the logits tensor")
    head, kind = _nearest_classifier(logits, gm)
    linear_node = head if kind == "linear" else None
    final_linear = gm.get_submodule(linear_node.target) if (
        linear_node is not None and linear_node.op == "call_module") else None
    if feature_node is not None:
        feat = _find_by_name(gm, feature_node)
    elif linear_node is not None:
        feat = _strip_pass(linear_node.args[0], gm)
    else:
        feat = None
    fmap = None
    if feat is not None:
        cand = _strip_pass(feat, gm, reshapes=True)
        if _is_pool(cand, gm):
            fmap = cand.args[0]
    elif kind == "conv":
        fmap = _strip_pass(head.args[0], gm)
    return logits, feat, fmap, final_linear


def partition(gm: fx.GraphModule, splits: list[str], feature_node: str | None = None) -> Partition:
    """Cut ``gm`` at ``splits`` (validated: known, in order) into level GraphModules."""
    firsts = _first_nodes(gm, splits)
    nodes = list(gm.graph.nodes)
    level_of: dict[fx.Node, int] = {}
    for i, n in enumerate(nodes):
        if n.op in ("placeholder", "get_attr"):
            level_of[n] = 0
        elif n.op == "output":
            level_of[n] = len(splits)
        else:
            level_of[n] = sum(1 for f in firsts if f <= i)
    logits, feat, fmap, final_linear = find_heads(gm, feature_node)
    n_levels = len(splits) + 1
    if level_of[logits] != n_levels - 1:
        raise SpecError(f"the last split {splits[-1]!r} comes after the logits are computed; the "
                        f"last level would be empty - choose a split before the classifier")
    heads = [x for x in (logits, feat, fmap) if x is not None]
    _keep_intact(gm, [x for x in (feat, fmap) if x is not None])

    levels, level_inputs, level_outputs, cut_names = [], [], [], [None]
    model_inputs = [(n.name, str(n.target), n.args[0] if n.args else REQUIRED)
                    for n in nodes if n.op == "placeholder"]
    for lv in range(n_levels):
        members = [n for n in nodes if level_of[n] == lv and n.op not in ("output", "get_attr")
                   and (n.op != "placeholder")]
        # Values produced at an earlier level (or model inputs) that this level reads.
        crossing: list[fx.Node] = []
        for n in members:
            for a in n.all_input_nodes:
                if a.op == "get_attr":
                    continue
                if (a.op == "placeholder" or level_of[a] < lv) and a not in crossing:
                    crossing.append(a)
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for a in crossing:
            env[a] = g.placeholder(a.name)
        for n in members:
            for a in n.all_input_nodes:
                if a.op == "get_attr" and a not in env:
                    env[a] = g.node_copy(a)
            env[n] = g.node_copy(n, lambda x: env[x])
        # Outputs: values later levels read, plus the heads (logits / features / feature map),
        # which may be computed before the last cut (e.g. a split at the classifier).
        later = [n for n in members if n in heads or any(level_of[u] > lv for u in n.users)]
        g.output({n.name: env[n] for n in later if n in env})
        level_gm = fx.GraphModule(gm, g, f"{type(gm).__name__}Level{lv}")
        levels.append(level_gm)
        level_inputs.append([a.name for a in crossing])
        level_outputs.append([n.name for n in later])
        if lv >= 1:
            cut_names.append(next((a.name for a in crossing if isinstance(a, fx.Node)), None))
    part = Partition(gm=gm, levels=levels, level_inputs=level_inputs, level_outputs=level_outputs,
                     model_inputs=model_inputs, cut_names=cut_names, logits_name=logits.name,
                     features_name=feat.name if feat is not None else None,
                     feature_map_name=fmap.name if fmap is not None else None,
                     final_linear=final_linear)
    part.tied = _tied_parameters(levels)
    part.unexecuted = _unexecuted_keys(gm, levels)
    return part


def _keep_intact(gm: fx.GraphModule, heads: list[fx.Node]) -> None:
    """Make the in-place ops that read a head out of place: MNASNet's and EfficientNet's
    ``Dropout(inplace=True)`` after the pooled features would otherwise overwrite the features the
    aggregators read (OKDDip's attention) with their dropped-out copy in training. Only the traced
    copy changes; the exported model keeps the original modules."""
    for head in heads:
        for user in head.users:
            if user.op == "call_module" and getattr(gm.get_submodule(user.target), "inplace", False):
                gm.get_submodule(user.target).inplace = False
            elif user.op == "call_function" and user.kwargs.get("inplace", False):
                user.kwargs = {**user.kwargs, "inplace": False}


def _tied_parameters(levels: list[fx.GraphModule]) -> dict[str, dict[int, list[str]]]:
    """Parameters read by more than one level: first name -> {level: the names it has there}."""
    owners: dict[int, tuple[str, dict[int, list[str]]]] = {}
    for lv, m in enumerate(levels):
        for name, p in m.named_parameters(remove_duplicate=False):
            entry = owners.setdefault(id(p), (name, {}))
            entry[1].setdefault(lv, []).append(name)
    return {name: names for name, names in owners.values() if len(names) > 1}


def _unexecuted_keys(gm: fx.GraphModule, levels: list[fx.GraphModule]) -> list[str]:
    used = set()
    for m in levels:
        used.update(m.state_dict().keys())
    return [k for k in gm.state_dict().keys() if k not in used]


def make_inplace_safe(level: fx.GraphModule) -> int:
    """Stop a replicated level from writing into values it shares with its siblings.

    Sibling branches read the same parent activation; an in-place op at the start of one
    branch (``ReLU(inplace=True)``, ``x.add_(...)``) would corrupt it for the others and
    break backward. Modules get ``inplace=False``; in-place methods/functions read a clone.
    Returns how many places were changed.
    """
    changed = 0
    inputs = {n for n in level.graph.nodes if n.op == "placeholder"}
    for n in list(level.graph.nodes):
        if not any(a in inputs for a in n.all_input_nodes):
            continue
        if n.op == "call_module":
            m = level.get_submodule(n.target)
            if getattr(m, "inplace", False):
                m.inplace = False
                changed += 1
        elif n.op == "call_function" and n.kwargs.get("inplace", False):
            n.kwargs = {**n.kwargs, "inplace": False}
            changed += 1
        elif (n.op == "call_method" and n.target.endswith("_") and not n.target.endswith("__")) or (
                n.op == "call_function" and (n.target in (operator.iadd, operator.imul, operator.isub)
                                             or getattr(n.target, "__name__", "").endswith("_"))):
            first = n.args[0]
            if first in inputs:
                with level.graph.inserting_before(n):
                    clone = level.graph.call_method("clone", (first,))
                n.replace_input_with(first, clone)
                changed += 1
    if changed:
        level.recompile()
    return changed
