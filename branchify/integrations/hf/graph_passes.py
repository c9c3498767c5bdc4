"""Rewrites of the traced graph: the wrapper removed, constants moved, unreferenced state anchored.

Examples:
    >>> graph = strip_graph(graph, strip)                           # doctest: +SKIP
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.fx as fx
from torch import nn

from .inputs import WRAPPER_ATTR


def root_view(model: nn.Module) -> nn.Module:
    """A shallow copy of ``model``: the same submodules, parameters, buffers and config, but its
    own attribute namespace, so constants of the trace can live on it without touching ``model``.

    Examples:
        >>> view = root_view(bert); view.bert is bert.bert                     # doctest: +SKIP
        True
    """
    view = copy.copy(model)
    view._non_persistent_buffers_set = set(model._non_persistent_buffers_set)  # its own, see below
    return view


def move_wrapper_constants(graph: fx.Graph, wrapper: nn.Module, view: nn.Module) -> list[str]:
    """Move what fx stored on the tracing wrapper itself onto ``view`` (returns the new names).

    fx keeps tensors created during tracing (``torch.tensor(mid - 1)`` in DeBERTa-v2's relative
    position buckets) as ``_tensor_constant<i>`` attributes of the module being traced - here the
    temporary wrapper, which the final GraphModule never sees; the coarse tracer stores
    non-tensor constants there too. Each one is moved to the view of the HF model (renamed if the
    model already has an attribute of that name) and its ``get_attr`` nodes are retargeted.
    Tensors are marked non-persistent, so the GraphModule holds them as buffers that follow
    ``.to(device)`` but stay out of ``state_dict()`` (checkpoints keep the original keys).

    Examples:
        >>> move_wrapper_constants(graph, wrapper, view)               # doctest: +SKIP
        ['_tensor_constant0', '_tensor_constant1']
    """
    moved: dict[str, str] = {}
    for n in graph.nodes:
        if n.op != "get_attr" or str(n.target) == WRAPPER_ATTR or str(n.target).startswith(WRAPPER_ATTR + "."):
            continue
        old = str(n.target)
        if old not in moved:
            name = old
            while hasattr(view, name):
                name = "_branchify" + name if not name.startswith("_branchify") else name + "_"
            value = getattr(wrapper, old)
            setattr(view, name, value)
            if isinstance(value, torch.Tensor):
                view._non_persistent_buffers_set.add(name)
            moved[old] = name
        n.target = moved[old]
    for old in moved:
        try:
            delattr(wrapper, old)
        except AttributeError:
            pass
    return list(moved.values())


def strip_graph(graph: fx.Graph, strip: Callable[[str], str]) -> fx.Graph:
    """Copy ``graph`` with the wrapper prefix removed from targets, module stacks and node names.

    Examples:
        >>> strip_graph(graph, HFTracer._strip)                        # doctest: +SKIP
        <torch.fx.graph.Graph object ...>
    """
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    prefix = WRAPPER_ATTR + "_"
    for n in graph.nodes:
        target = n.target
        if n.op in ("call_module", "get_attr"):
            target = strip(str(target))
        args = fx.node.map_arg(n.args, lambda x: env[x])
        kwargs = fx.node.map_arg(n.kwargs, lambda x: env[x])
        name = n.name[len(prefix):] if n.name.startswith(prefix) else n.name
        m = new.create_node(n.op, target, args, kwargs, name=name, type_expr=n.type)
        meta = dict(n.meta)
        stack = meta.get("nn_module_stack")
        if stack:
            meta["nn_module_stack"] = type(stack)(
                (strip(k), (strip(v[0]), v[1])) for k, v in stack.items() if v[0] != WRAPPER_ATTR)
        m.meta = meta
        env[n] = m
    # training=self.training arguments (dropout) are made dynamic by the core tracing step
    # (branchify.surgery.training_mode.follow_training_mode), which runs on every tracer's graph.
    drop_dead_nodes(new)
    return new


def anchor_unreferenced_state(graph: fx.Graph, model: nn.Module) -> int:
    """Add an (unused) ``get_attr`` for every state_dict entry the graph never references.

    Tied weights that no traced operation reads under their own name (T5's and Marian's
    ``shared`` embedding, which runs as ``encoder.embed_tokens``) and modules the forward
    never calls would otherwise be missing from the traced GraphModule, so branchify could
    not report them as "never executed" and ``export()``'s strict load would fail. Anchored,
    they are filled from the original model at export (:meth:`BranchedHFModel.export_pretrained`
    fills tied ones from their trained partner instead).

    Examples:
        >>> anchor_unreferenced_state(graph, t5)          # T5's ``shared.weight``   # doctest: +SKIP
        1
    """
    targets = {str(n.target) for n in graph.nodes if n.op in ("call_module", "get_attr")}
    prefixes = tuple(t + "." for t in targets)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    anchor = placeholders[-1] if placeholders else None
    added = 0
    for key in model.state_dict(keep_vars=True):
        if key in targets or key.startswith(prefixes):
            continue
        if anchor is None:
            with graph.inserting_before(next(iter(graph.nodes))):
                anchor = graph.get_attr(key)
        else:
            with graph.inserting_after(anchor):
                anchor = graph.get_attr(key)
        added += 1
    return added


def drop_dead_nodes(graph: fx.Graph) -> None:
    """Remove unused pure nodes (shape queries, unused attribute reads) left by tracing; keep
    in-place calls and side effects (the run-time input checks, ``torch._assert``).

    Examples:
        >>> drop_dead_nodes(graph)                                     # doctest: +SKIP
    """
    for n in reversed(list(graph.nodes)):
        if n.users or n.op not in ("call_function", "call_method", "get_attr") or n.is_impure():
            continue
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):
            continue  # in-place: keep its side effect
        graph.erase_node(n)
