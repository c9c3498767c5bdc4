"""A readable summary of a branched model: the tree, parameters and FLOPs per leaf.

``model.py`` imports this module for :meth:`BranchedModel.describe`, so the model is typed
``nn.Module`` here rather than imported back (no import cycle, not even a type-only one); every
function reads a :class:`~branchify.model.BranchedModel`'s attributes (``segments``, ``spec``, ...).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .tree import TRUNK_KEY, TreePath, lineage, segment_key
from .views import views_cost


@contextmanager
def loop_only(model: nn.Module) -> Iterator[None]:
    """Run ``model`` one call per replica inside the block (per-segment FLOP counting needs it).

    Examples:
        >>> with loop_only(bm):        # doctest: +SKIP
        ...     out = bm(x)
    """
    mode = model.batched
    model.batched = False
    try:
        yield
    finally:
        model.batched = mode


def _fmt(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _example_inputs(model: nn.Module, example_inputs: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if example_inputs or kwargs:
        return example_inputs, kwargs
    if model.example_inputs is None:
        raise ValueError("describe() needs an example input for FLOPs: call model.describe(x) or run "
                         "one forward first")
    device = next(model.parameters()).device
    made = {}
    for name, shape, dtype in model.example_inputs:
        made[name] = (torch.randint(0, 2, shape, device=device) if not dtype.is_floating_point
                      else torch.randn(shape, dtype=dtype, device=device))
    args = tuple(made[n] for n, _, _ in model.model_inputs if n in made)
    return args, {}


def segment_flops(model: nn.Module, *example_inputs: Any, **kwargs: Any) -> dict[str, int]:
    """Forward FLOPs of every segment (``trunk``, ``b0``...), counted with torch's FlopCounter."""
    args, kwargs = _example_inputs(model, example_inputs, kwargs)
    was_training = model.training
    model.eval()
    try:  # one call per replica, so each segment's FLOPs are attributed to its own module
        with torch.no_grad(), loop_only(model), FlopCounterMode(display=False) as counter:
            model(*args, **kwargs)
    finally:
        model.train(was_training)
    counts = counter.get_flop_counts()
    out = {}
    for key in model.segments:
        for name, per_op in counts.items():
            if name.endswith(f"segments.{key}"):
                out[key] = int(sum(per_op.values()))
        out.setdefault(key, 0)
    return out


def describe(model: nn.Module, *example_inputs: Any, **kwargs: Any) -> str:
    """The tree, then a table of parameters and forward FLOPs per leaf and in total.

    The leaf row counts the segments on its root-to-leaf path (what ``export(leaf)`` deploys).
    "Training cost" is the whole tree's forward FLOPs over the target leaf's: roughly what a
    training step costs relative to training the original model alone.

    Examples:
        >>> print(bm.describe(torch.randn(2, 3, 32, 32), print_fn=None))   # doctest: +SKIP
    """
    flops = segment_flops(model, *example_inputs, **kwargs)
    params = {k: sum(p.numel() for p in seg.parameters()) for k, seg in model.segments.items()}
    spec = model.spec
    lines = [f"BranchedModel: {spec.num_leaves} leaves, splits {spec.splits}, fanout {spec.fanout}"
             + (f", deepen {spec.deepen} (appended blocks start as "
                f"{'the identity' if spec.deepen_init == 'identity' else 'freshly initialised blocks'})"
                if spec.deepen else ""),
             f"replica init: {model.init_used}"]
    if getattr(model, "split_reason", None):
        lines.append(model.split_reason)
    for key, d in (getattr(model, "deepened", None) or {}).items():
        lines.append(f"deepened: copies of {d['block']} ({d['class']}) go right after it (deepen key {key!r}: "
                     f"{spec.deepen[key]} per leaf); they start as {d['start']}")
        if d.get("note"):
            lines.append(f"  (fallback: {d['note']})")
    if getattr(model, "unfrozen", None):
        lines.append(f"frozen in the original, trainable in these re-initialised replicas: {model.unfrozen}")
    if getattr(model, "tied", None):
        lines.append(f"shared across the cut (one tensor): {sorted(model.tied)}")
    lines.append("tree:")
    g = spec.graph()

    def walk(path: TreePath, indent: str) -> None:
        node = g.nodes[path]
        label = f"{TRUNK_KEY} (shared)" if not path else f"{segment_key(path)}  [after {node['split']}]"
        if "leaf" in node:
            label += f"  -> leaf {node['leaf']}" + ("  (target)" if node["leaf"] == spec.target else "")
        key = segment_key(path)
        lines.append(f"{indent}{label}  params {_fmt(params[key])}  FLOPs {_fmt(flops[key])}")
        for child in sorted(g.successors(path)):
            walk(child, indent + "  ")

    walk((), "  ")
    lines.append("")
    lines.append(f"{'leaf':>6} {'path':<14} {'params':>10} {'FLOPs':>10}")
    target_flops = 0
    for i, path in enumerate(model.leaf_paths):
        keys = [segment_key(p) for p in lineage(path)]
        p = sum(params[k] for k in keys)
        f = sum(flops[k] for k in keys)
        if i == spec.target:
            target_flops = f
        lines.append(f"{i:>6} {str(path):<14} {_fmt(p):>10} {_fmt(f):>10}" + ("  target" if i == spec.target else ""))
    total_p = sum(params.values())
    total_f = sum(flops.values())
    agg_p = sum(p.numel() for p in model.aggregator.parameters()) if model.aggregator is not None else 0
    lines.append(f"{'total':>6} {'':<14} {_fmt(total_p + agg_p):>10} {_fmt(total_f):>10}"
                 + (f"  (aggregator {_fmt(agg_p)} params)" if agg_p else ""))
    if target_flops:
        lines.append(f"training cost vs the original model: {total_f / target_flops:.2f}x forward FLOPs; "
                     f"deployed leaf costs 1.00x")
    if getattr(model, "views", None) is not None:  # branchify.views: every leaf's path runs on its own view
        with_views, without = views_cost(model, flops)
        vs_model = f", {with_views / target_flops:.2f}x the original model" if target_flops else ""
        lines.append(f"per-leaf views (training mode): the shared segments run once per leaf - "
                     f"{_fmt(with_views)} forward FLOPs per batch instead of {_fmt(without)} "
                     f"({with_views / max(without, 1):.2f}x the tree without views{vs_model}); eval runs the tree once")
    return "\n".join(lines)
