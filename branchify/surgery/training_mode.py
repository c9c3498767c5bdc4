"""Make traced calls that take ``training=self.training`` follow ``.train()`` / ``.eval()``.

torch.fx records an argument such as ``F.dropout(x, p, self.training)`` with the Python bool it
had while tracing, so the traced graph would drop units (or blocks: torchvision's
``stochastic_depth``) in eval mode forever - or never in training, when traced from an eval-mode
model. Every recorded call to a function with a parameter named ``training`` whose value was a
constant bool is rewritten to read the graph module's own ``training`` flag at run time (a
``get_attr("training")`` node), which ``.train()`` / ``.eval()`` of the branched model set.

Python control flow on ``self.training`` inside a traced forward (``if self.training: ...``) is
resolved while tracing and cannot be recovered; make such a module a leaf
(``branchify.Tracer(leaf_modules=[ThatModule])``) so it runs as itself.

Examples:
    >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2)))    # doctest: +SKIP
    >>> follow_training_mode(gm.graph)                                 # doctest: +SKIP
    0
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch.fx as fx

_POSITIONS: dict[Any, int | None] = {}


def _training_position(fn: Callable) -> int | None:
    """Index of ``fn``'s ``training`` parameter, or ``None`` (no such parameter, or no signature)."""
    if fn not in _POSITIONS:
        try:
            names = list(inspect.signature(fn).parameters)
        except (TypeError, ValueError):  # builtins without a Python signature
            names = []
        _POSITIONS[fn] = names.index("training") if "training" in names else None
    return _POSITIONS[fn]


def follow_training_mode(graph: fx.Graph) -> int:
    """Rewrite constant ``training`` arguments into reads of the module's flag; returns how many."""
    changed = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or not callable(node.target):
            continue
        try:
            pos = _training_position(node.target)
        except TypeError:  # unhashable target
            continue
        if pos is None:
            continue
        if "training" in node.kwargs:
            value, where = node.kwargs["training"], "kw"
        elif len(node.args) > pos:
            value, where = node.args[pos], "arg"
        else:
            continue  # left at the function's default: not self.training
        if not isinstance(value, bool):
            continue
        with graph.inserting_before(node):
            flag = graph.get_attr("training")
        if where == "kw":
            node.kwargs = {**node.kwargs, "training": flag}
        else:
            node.args = (*node.args[:pos], flag, *node.args[pos + 1:])
        changed += 1
    return changed
