"""Where to cut a model when the user does not say: a rule stated once, for every model.

**The rule.** The model is traced (on a copy) and its *body* is found: the shallowest module whose
direct children include at least three modules of one class that each run as themselves and
hold parameters - the stages of a ResNet
or RegNet (``layer1..layer4``), the blocks of a MobileNet or EfficientNet (``features.*``), the
layers of a ViT or BERT (``encoder.layer.*``). Among such groups (at that depth) the one doing the
most work wins, counted as the traced modules inside it (so a VGG's convolutions win over its three
large classifier layers). Its ``n`` blocks are the block boundaries. A one-level tree (ONE, OKDDip, AHBF, CL-ILR,
DML with a trunk) is cut at block ``ceil(2n/3)`` - the last stage of a 3- or 4-stage network, the
9th of 12 transformer layers; a tree of ``L >= 2`` levels (TSA) at blocks ``ceil(k n / (L + 1))``,
``k = 1..L`` - ``ceil(n/3)`` and ``ceil(2n/3)`` for two (0-based, at least 1, at most ``n - 1``).
A model without such a group is cut among its top-level children by the same fractions.

Examples:
    >>> default_splits(torchvision.models.resnet18(), levels=2).splits      # doctest: +SKIP
    ['layer3', 'layer4']
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn

from .partition import list_split_points
from .tracing import TracedCopy, traced_copy


@dataclass(frozen=True)
class DefaultSplits:
    """The chosen split points and why (``describe()`` prints ``reason``)."""

    splits: list[str]
    body: str
    blocks: list[str]
    reason: str
    traced: TracedCopy | None = field(default=None, repr=False, compare=False)
    """The traced copy the choice was read from (``branchify(..., traced=)`` cuts it, no second trace)."""


def _first_run(path: str, executed: list[str]) -> int | None:
    """Where ``path`` (or anything inside it: a ModuleList never runs itself) first runs."""
    for i, p in enumerate(executed):
        if p == path or p.startswith(path + "."):
            return i
    return None


def _executed_children(module: nn.Module, prefix: str, executed: list[str]) -> list[tuple[str, nn.Module]]:
    """Direct children that run, in execution order."""
    kids = []
    for n, m in module.named_children():
        path = f"{prefix}.{n}" if prefix else n
        first = _first_run(path, executed)
        if first is not None:
            kids.append((first, path, m))
    return [(p, m) for _, p, m in sorted(kids, key=lambda t: t[0])]


def _ops(path: str, executed: list[str]) -> int:
    """How many traced module paths lie inside ``path``: a proxy for the work it does."""
    return sum(1 for p in executed if p == path or p.startswith(path + "."))


def _group(children: list[tuple[str, nn.Module]], executed: list[str]) -> tuple[list[str], int]:
    """The same-class children (at least 3) that do the most work, in execution order, and that
    work; ``([], 0)`` if no class repeats three times."""
    runs_itself = set(executed)
    by_class: dict[type, list[tuple[str, nn.Module]]] = {}
    for path, m in children:
        # A block is a cut point: it must run as itself (a ModuleList or ModuleDict of stages
        # never does) and do real work (three nn.Identity placeholders are no body).
        if path in runs_itself and any(True for _ in m.parameters()):
            by_class.setdefault(type(m), []).append((path, m))
    groups = [(g, sum(_ops(p, executed) for p, _ in g)) for g in by_class.values() if len(g) >= 3]
    if not groups:
        return [], 0
    best, size = max(groups, key=lambda gs: (gs[1], len(gs[0])))
    return [p for p, _ in best], size


def find_body(model: nn.Module, executed: list[str]) -> tuple[str, list[str]]:
    """``(body path, its block paths)`` by the rule in the module docstring."""
    level: list[tuple[str, nn.Module]] = [("", model)]
    while level:
        found = []
        for path, module in level:
            blocks, size = _group(_executed_children(module, path, executed), executed)
            if blocks:
                found.append((size, path, blocks))
        if found:
            _, path, blocks = max(found, key=lambda t: t[0])
            return path, blocks
        level = [(p, m) for path, module in level for p, m in _executed_children(module, path, executed)]
    return "", [p for p, _ in _executed_children(model, "", executed)]


def pick_blocks(blocks: list[str], levels: int) -> list[str]:
    """The default rule's choice among a body's ``blocks`` (in execution order): one level cuts at
    block ``ceil(2n/3)``, ``L`` levels at ``ceil(k n/(L+1))`` for ``k = 1..L`` (never the first block).

    Examples:
        >>> pick_blocks([f"layer.{i}" for i in range(12)], 1), pick_blocks([f"b{i}" for i in range(6)], 2)
        (['layer.8'], ['b2', 'b4'])
    """
    n = len(blocks)
    fractions = [2 / 3] if levels == 1 else [k / (levels + 1) for k in range(1, levels + 1)]
    idx = [min(max(math.ceil(f * n), 1), n - 1) for f in fractions]
    if len(set(idx)) != len(idx):
        raise ValueError(f"the body has only {n} blocks, too few for a {levels}-level tree")
    return [blocks[i] for i in idx]


def default_splits(model: nn.Module, levels: int = 1, tracer: fx.Tracer | None = None) -> DefaultSplits:
    """The default split points of ``model`` for a tree of ``levels`` levels (see the module docstring).

    The model is traced on a deep copy, so tracing can leave nothing behind in ``model``; the copy
    comes back as ``traced``.
    """
    traced = traced_copy(model, tracer)
    work = traced.work
    executed = [p for p in list_split_points(traced.graph)
                if p != "<input>"]
    body, blocks = find_body(work, executed)
    if len(blocks) < levels + 1:
        raise ValueError(f"cannot choose a default split for {type(model).__name__}: its body "
                         f"{body or '(top level)'!r} has {len(blocks)} block(s) {blocks}, too few for a "
                         f"{levels}-level tree")
    splits = pick_blocks(blocks, levels)
    where = f"'{body}'" if body else "the top level"
    reason = (f"default split {splits}: the body {where} has {len(blocks)} blocks ({blocks[0]} .. {blocks[-1]}); "
              f"{'one level cuts at block ceil(2n/3)' if levels == 1 else 'two levels cut at ceil(n/3), ceil(2n/3)'}")
    return DefaultSplits(splits=splits, body=body, blocks=blocks, reason=reason, traced=traced)
