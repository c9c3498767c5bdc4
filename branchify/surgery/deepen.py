"""AHBF-style deepening: copies of a block inserted right after it (or trailing blocks removed) in one leaf.

A deepen key names a **container** (``nn.Sequential`` / ``nn.ModuleList``) - copies of its last
block are appended, negative counts remove trailing blocks - or a **block** that is a child of
one: copies go right after it, and the container's later children (the 1x1 convolution closing a
MobileNet's ``features``) move back by as many places. Copies are named as the export names them:
numbered containers renumber (``features.12`` is the first copy, the old ``features.12`` becomes
``features.13``); a container with named children gets the copies as ``str(len)``, ``str(len + 1)``.

Two more forms: a **run** ``"features[25:28]"`` - children 25, 26, 27 of an ``nn.Sequential``
(a VGG's convolution, its BatchNorm and ReLU) - is copied as one ``nn.Sequential`` placed after
the run's last child; a **block whose parent is no container** (GoogLeNet's ``inception5a``),
called with one tensor, becomes ``nn.Sequential(block, copy, ...)`` (``inception5a.0`` is the
original, ``inception5a.1`` the first copy). A key ending in ``@transition`` copies a block that
only changes its map's channels, each copy after a fresh transition back to its input width
(:mod:`branchify.surgery.deepen_target`).

Facts about the blocks come from one real forward of the model on a synthesised input
(:func:`~branchify.surgery.block_calls.record_calls`): a block can be copied when its main output
has its main input's shape; a copy that should start as the identity is checked on the arguments
the block received (:mod:`branchify.surgery.identity`). Only for a model that cannot be run that
way are shapes probed from the block's first layer.
"""
from __future__ import annotations

import copy
import operator
from collections import OrderedDict

import torch
import torch.fx as fx
from torch import nn

from ..spec import SpecError
from .block_calls import Call, record_calls
from .deepen_target import Target, call_of, not_a_block, one_tensor_call, resolve_target, width_change
from .identity import identity_init, identity_init_how, probe_shape  # noqa: F401  (identity_init re-exported)
from .tracing import node_module_paths


def prepare_deepen(model: nn.Module, deepen: dict[str, list[int]], tracer: fx.Tracer | None = None
                   ) -> dict[str, Target]:
    """Resolve and check every deepen key: copied blocks keep the shape of their input (read off a
    recorded forward), removed blocks too, and removal leaves one block.

    Examples:
        >>> prepare_deepen(torchvision.models.resnet18(), {"layer4": [0, 2]})["layer4"].block   # doctest: +SKIP
        'layer4.1'
    """
    targets = {key: resolve_target(model, key) for key in deepen}
    if not targets:
        return targets
    removed = [f"{t.container}.{name}" for key, t in targets.items() if min(deepen[key]) < 0 for name in t.names]
    try:
        calls = record_calls(model, [p for t in targets.values() for p in t.members] + removed, tracer)
    except (ValueError, RuntimeError):  # cannot run the model: probe shapes from the first layers
        calls = {}
    for key, extra in deepen.items():
        t = targets[key]
        t.call = call_of(calls, t)
        if t.transition:
            t.widths = (width_change(t.call) if one_tensor_call(t.call) else None) if t.call is not None else \
                _probed_widths(model.get_submodule(t.block))
            keeps = t.widths is not None
        else:
            keeps = t.call.keeps_shape() if t.call is not None else _keeps_shape(t.copy_of(model), None)
        if t.wrap and not (one_tensor_call(t.call) and keeps):
            raise not_a_block(model, t)
        if any(e > 0 for e in extra) and not keeps and t.transition:
            raise SpecError(f"deepen on {key!r}: {t.block} ({t.block_type}) is not called with one [B, C, H, W] "
                            f"map that it returns at the same size with other channels{_shapes(t.call)}, so "
                            f"no transition can bring its copies back to its input; drop '@transition'")
        if any(e > 0 for e in extra) and not keeps:
            raise SpecError(f"deepen on {key!r}: its block {t.block} ({t.block_type}) "
                            f"does not keep the shape of its input{_shapes(t.call)}, so copies of it "
                            f"cannot follow it. Choose a "
                            f"shape-preserving block (a ResNet stage's last block, a transformer layer)")
        most_removed = -min(extra + [0])
        if most_removed and t.key != t.container:
            raise SpecError(f"deepen on {key!r} removes blocks, which needs a container (name {t.container!r})")
        if most_removed >= len(t.names):
            raise SpecError(f"deepen on {key!r} removes {most_removed} blocks but it has only {len(t.names)}; "
                            f"at least one must remain")
        for i in range(len(t.names) - most_removed, len(t.names)):
            path = f"{key}.{t.names[i]}"
            if not _keeps_shape(model.get_submodule(path), calls.get(path)):
                raise SpecError(f"deepen on {key!r}: block {i} is not shape-preserving, so it cannot be removed")
    return targets


def _shapes(call: Call | None) -> str:
    if call is None or call.hidden_in is None or call.hidden_out is None:
        return ""
    return f" ({tuple(call.hidden_in.shape)} -> {tuple(call.hidden_out.shape)} in a traced forward)"


def _probed_widths(block: nn.Module) -> tuple[int, int] | None:
    """``(output, input)`` channels of ``block`` run on the meta device on its first layer's input shape."""
    shape = probe_shape(block)
    if shape is None:
        return None
    try:
        with torch.no_grad():
            out = copy.deepcopy(block).to("meta").eval()(torch.empty(shape, device="meta"))
    except Exception:  # the block does not accept its own first layer's input shape
        return None
    return (int(out.shape[1]), shape[1]) if isinstance(out, torch.Tensor) and out.dim() == len(shape) else None


def _keeps_shape(block: nn.Module, call: Call | None) -> bool:
    if call is not None:
        return call.keeps_shape()
    shape = probe_shape(block)
    if shape is None:
        return False
    probe = copy.deepcopy(block).to("meta").eval()
    try:
        with torch.no_grad():
            out = probe(torch.empty(shape, device="meta"))
    except Exception:  # the block does not accept its own first layer's input shape
        return False
    return isinstance(out, torch.Tensor) and tuple(out.shape) == shape


def make_copies(work: nn.Module, t: Target, count: int, reinit, deepen_init: str) -> list[nn.Module]:
    """``count`` copies of the target's block, each passed through ``reinit(block, key_prefix)`` and,
    for ``deepen_init="identity"``, made to start as the identity (checked on the recorded call).

    Examples:
        >>> blocks = make_copies(work, target, 2, lambda blk, src: None, "identity")   # doctest: +SKIP
    """
    copies = []
    for _ in range(count):
        blk = t.copy_of(work)
        for k, path in enumerate(t.members):
            reinit(blk.get_submodule(t.part(k)[1:]), path + ".")
        how = "the architecture's own init" if deepen_init != "identity" else identity_init_how(blk, t.call)
        if how is None:
            unchecked = '' if t.call is not None else '; the model could not be run on a synthesised input to check'
            raise SpecError(f"deepen_init='identity': copies of {t.block} ({type(blk).__name__}) could not be made "
                            f"to start as the identity (no own zero_init_last(), layer scale, last normalisation "
                            f"scale or last projection of each residual branch whose zero silences it"
                            f"{unchecked}); "
                            f"pass deepen_init='standard' to keep the architecture's own init")
        t.how = how if deepen_init != "identity" else f"the identity ({how})"
        copies.append(blk)
    return copies


def deepen_graph(level: fx.GraphModule, t: Target, new_blocks: list[nn.Module], remove: int) -> None:
    """Insert ``new_blocks`` right after the target block's nodes, or drop the container's last
    ``remove`` blocks.

    Examples:
        >>> deepen_graph(replica, target, make_copies(work, target, 2, reinit, "identity"), 0)   # doctest: +SKIP
    """
    graph = level.graph
    inside = _nodes_of(graph, t.members)
    if not inside:
        raise SpecError(f"deepen on {t.key!r}: {t.block} does not run after the last split; deepening "
                        f"applies to a block that every leaf replicates")
    if new_blocks:
        _insert_copies(level, t, inside, new_blocks)
    if remove:
        last = [n for n in graph.nodes if t.container in node_module_paths(n)][-1]
        keep = f"{t.container}.{t.names[len(t.names) - remove - 1]}"
        last.replace_all_uses_with(_nodes_of(graph, [keep])[-1])
        graph.eliminate_dead_code()
        level.delete_all_unused_submodules()
    graph.lint()
    level.recompile()


def _under(target: object, path: str) -> bool:
    return isinstance(target, str) and (target == path or target.startswith(path + "."))


def _nodes_of(graph: fx.Graph, paths: list[str]) -> list[fx.Node]:
    """The nodes that run inside the modules at ``paths`` (their parameters read with ``get_attr`` included)."""
    return [n for n in graph.nodes if any(p in node_module_paths(n) or (n.op == "get_attr" and _under(n.target, p))
                                          for p in paths)]


def _main_input(inside: list[fx.Node]) -> fx.Node:
    members = set(inside)
    for node in inside:
        for a in node.all_input_nodes:
            if a not in members and a.op != "get_attr":
                return a
    raise SpecError(f"deepen: the block's nodes read no input ({inside[0].name} ...), so copies cannot be chained")


def _retarget(node: fx.Node, old: str, new: str) -> None:
    """Point a node that runs in module ``old`` at module ``new`` (target and module stack)."""
    if node.op in ("call_module", "get_attr") and _under(node.target, old):
        node.target = new + str(node.target)[len(old):]
    stack = node.meta.get("nn_module_stack")
    if stack:
        node.meta["nn_module_stack"] = type(stack)(
            (k, ((new + v[0][len(old):]) if _under(v[0], old) else v[0], *v[1:])) for k, v in stack.items())


def _rename_children(level: fx.GraphModule, container: str, renames: dict[str, str]) -> None:
    """Renumber the container's later children in the level (highest first, so no name collides)."""
    prefix = f"{container}." if container else ""
    for old in sorted(renames, key=int, reverse=True):
        old_path, new_path = prefix + old, prefix + renames[old]
        parent = level.get_submodule(container) if container else level
        if old in parent._modules:
            parent._modules[renames[old]] = parent._modules.pop(old)
        for node in level.graph.nodes:
            _retarget(node, old_path, new_path)


def _tuple_item(t: Target, inside: list[fx.Node], hidden: fx.Node) -> int | None:
    """For a leaf block that returns a tuple (an older Hugging Face layer: hidden states, attention
    weights...), the item a copy reads (the one the block's own input was, else 0); else ``None``."""
    node = inside[-1]
    if node.op != "call_module" or len(inside) != 1:
        return None
    if t.call is not None:
        returns_tuple = t.call.tuple_out
    else:
        returns_tuple = bool(node.users) and all(u.op == "call_function" and u.target is operator.getitem
                                                 and isinstance(u.args[1], int) for u in node.users)
    if not returns_tuple:
        return None
    return hidden.args[1] if hidden.op == "call_function" and hidden.target is operator.getitem else 0


def _insert_copies(level: fx.GraphModule, t: Target, inside: list[fx.Node], new_blocks: list[nn.Module]) -> None:
    graph, out_node, members = level.graph, inside[-1], set(inside)
    leaking = [n.name for n in inside[:-1] if any(u not in members for u in n.users)]
    if leaking:
        raise SpecError(f"deepen on {t.key!r}: {t.block} passes more than its output on ({leaking}), so copies "
                        f"of it cannot be chained; choose another block")
    hidden = _main_input(inside)
    item = _tuple_item(t, inside, hidden)
    names, renames = t.copy_names(len(new_blocks))
    _rename_children(level, t.container, renames)
    prefix = f"{t.container}." if t.container else ""
    sources = t.members
    if t.wrap:  # the block moves to <block>.0 of a new nn.Sequential, its copies follow it there
        parent = level.get_submodule(t.container) if t.container else level
        name = t.names[t.index]
        parent._modules[name] = nn.Sequential(OrderedDict([("0", parent._modules[name])]))
        for node in graph.nodes:
            _retarget(node, t.block, t.block + ".0")
        prefix, sources = t.block + ".", [t.block + ".0"]
    cursor, prev, created = out_node, out_node, set()
    for name, blk in zip(names, new_blocks):
        level.add_submodule(prefix + name, blk)
        if item is not None:
            with graph.inserting_after(cursor):
                prev = cursor = graph.call_function(operator.getitem, (prev, item))
            created.add(prev)
        if t.transition:  # the fresh transition back to the block's input width, one call
            with graph.inserting_after(cursor):
                prev = cursor = graph.call_module(f"{prefix}{name}.transition", (prev,))
            created.add(prev)
        env = {hidden: prev}
        for node in inside:
            with graph.inserting_after(cursor):
                new = graph.node_copy(node, lambda a, env=env: env.get(a, a))
            for k, src in enumerate(sources):
                _retarget(new, src, prefix + name + t.part(k))
            env[node] = cursor = new
            created.add(new)
        prev = env[out_node]
    out_node.replace_all_uses_with(prev, delete_user_cb=lambda u: u not in created)


def deepened_skeleton(skeleton: nn.Module, deepen: dict[str, int]) -> nn.Module:
    """A copy of the (meta) original model with ``deepen[key]`` copies after each key's block
    (or that many trailing blocks removed), named as :func:`deepen_graph` names them.

    Examples:
        >>> len(deepened_skeleton(torchvision.models.resnet18(), {"layer4": 2}).layer4)   # doctest: +SKIP
        4
    """
    model = copy.deepcopy(skeleton)
    for key, extra in deepen.items():
        t = resolve_target(model, key)
        if t.transition:
            t.widths = _probed_widths(model.get_submodule(t.block))
        cont = model.get_submodule(t.container) if t.container else model
        items = list(cont._modules.items())
        if t.wrap:
            names, _ = t.copy_names(extra)
            block = items[t.index][1]
            cont._modules[items[t.index][0]] = nn.Sequential(OrderedDict(
                [("0", block)] + [(name, t.copy_of(model)) for name in names]))
            continue
        if extra > 0:
            names, renames = t.copy_names(extra)
            copies = [t.copy_of(model) for _ in names]
            new = OrderedDict()
            for i, (k, m) in enumerate(items):
                new[renames.get(k, k)] = m
                if i == t.index:
                    new.update(zip(names, copies))
        else:
            new = OrderedDict(items[:len(items) + extra])
        numbered = _layer_indices(cont) == list(range(len(items)))
        cont._modules.clear()
        cont._modules.update(new)
        _recount(model, cont, len(items), extra)
        if numbered:  # Hugging Face layers index their KV cache by layer_idx: the copies get their own
            for i, block in enumerate(cont):
                for sub in block.modules():
                    if isinstance(getattr(sub, "layer_idx", None), int):
                        sub.layer_idx = i
    return model


def _layer_indices(cont: nn.Module) -> list[int | None]:
    """Each child's ``layer_idx`` (the first found inside it), ``None`` where it has none."""
    return [next((s.layer_idx for s in child.modules() if isinstance(getattr(s, "layer_idx", None), int)), None)
            for child in cont.children()]


def _recount(model: nn.Module, cont: nn.Module, n: int, extra: int) -> None:
    """A model whose config counts the container's blocks (Hugging Face's ``num_hidden_layers``, read
    by forwards that run ``layers[:num_hidden_layers]``) counts the new ones too."""
    config = getattr(model, "config", None)
    if isinstance(cont, nn.ModuleList) and getattr(config, "num_hidden_layers", None) == n:
        config.num_hidden_layers = n + extra
        types = getattr(config, "layer_types", None)
        if isinstance(types, list) and len(types) == n:
            config.layer_types = types + types[-1:] * extra if extra > 0 else types[:n + extra]
