"""AHBF-style deepening: copies of a block inserted right after it (or trailing blocks removed) in one leaf.

A deepen key names a **container** (``nn.Sequential`` / ``nn.ModuleList``) - copies of its last
block are appended, negative counts remove trailing blocks - or a **block** that is a child of
one: copies go right after it, and the container's later children (the 1x1 convolution closing a
MobileNet's ``features``) move back by as many places. Copies are named as the export names them:
numbered containers renumber (``features.12`` is the first copy, the old ``features.12`` becomes
``features.13``); a container with named children gets the copies as ``str(len)``, ``str(len + 1)``.

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
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from ..spec import SpecError
from .block_calls import Call, record_calls
from .identity import identity_init, identity_init_how, probe_shape  # noqa: F401  (identity_init re-exported)
from .tracing import node_module_paths

_CONTAINERS = (nn.Sequential, nn.ModuleList)


@dataclass
class Target:
    """Where one deepen key puts its copies: after child ``name`` (position ``index``) of ``container``."""

    key: str
    container: str
    index: int
    names: list[str]
    call: Call | None = None
    block_type: str = ""
    how: str = ""

    def report(self) -> dict[str, str]:
        """What ``describe()`` says: the block copied, its class, and how its copies start."""
        return {"block": self.block, "class": self.block_type, "start": self.how}

    @property
    def block(self) -> str:
        """Path of the block that is copied."""
        return f"{self.container}.{self.names[self.index]}" if self.container else self.names[self.index]

    def copy_names(self, count: int) -> tuple[list[str], dict[str, str]]:
        """``(names of the copies, renames of the later children)`` for ``count`` copies."""
        n = len(self.names)
        if self.names == [str(i) for i in range(n)]:
            return ([str(self.index + 1 + j) for j in range(count)],
                    {str(k): str(k + count) for k in range(self.index + 1, n)})
        return [str(n + j) for j in range(count)], {}


def resolve_target(model: nn.Module, key: str) -> Target:
    """The :class:`Target` a deepen key names (see the module docstring).

    Examples:
        >>> resolve_target(torchvision.models.resnet18(), "layer4").block      # doctest: +SKIP
        'layer4.1'
    """
    try:
        module = model.get_submodule(key)
    except AttributeError:
        raise SpecError(f"deepen names {key!r}, which is not a submodule of {type(model).__name__}") from None
    if isinstance(module, _CONTAINERS):
        if len(module) == 0:
            raise SpecError(f"deepen on {key!r}: the container is empty")
        names = list(module._modules)
        return Target(key, key, len(names) - 1, names, block_type=type(module[-1]).__name__)
    container, _, name = key.rpartition(".")
    parent = model.get_submodule(container) if container else model
    if not isinstance(parent, _CONTAINERS):
        raise SpecError(f"deepen needs a container of blocks (nn.Sequential / nn.ModuleList) or a block inside "
                        f"one; {key!r} is a {type(module).__name__} inside a {type(parent).__name__}. Name the "
                        f"stage that holds the blocks (e.g. 'layer4') or one of its blocks")
    names = list(parent._modules)
    return Target(key, container, names.index(name), names, block_type=type(module).__name__)


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
        calls = record_calls(model, [t.block for t in targets.values()] + removed, tracer)
    except (ValueError, RuntimeError):  # cannot run the model: probe shapes from the first layers
        calls = {}
    for key, extra in deepen.items():
        t = targets[key]
        t.call = calls.get(t.block)
        if any(e > 0 for e in extra) and not _keeps_shape(model, t.block, t.call):
            raise SpecError(f"deepen on {key!r}: its block {t.block} ({type(model.get_submodule(t.block)).__name__}) "
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
            if not _keeps_shape(model, f"{key}.{t.names[i]}", calls.get(f"{key}.{t.names[i]}")):
                raise SpecError(f"deepen on {key!r}: block {i} is not shape-preserving, so it cannot be removed")
    return targets


def _shapes(call: Call | None) -> str:
    if call is None or call.hidden_in is None or call.hidden_out is None:
        return ""
    return f" ({tuple(call.hidden_in.shape)} -> {tuple(call.hidden_out.shape)} in a traced forward)"


def _keeps_shape(model: nn.Module, path: str, call: Call | None) -> bool:
    if call is not None:
        return call.keeps_shape()
    block = model.get_submodule(path)
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
        blk = copy.deepcopy(work.get_submodule(t.block))
        reinit(blk, t.block + ".")
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
    inside = _nodes_of(graph, t.block)
    if not inside:
        raise SpecError(f"deepen on {t.key!r}: {t.block} does not run after the last split; deepening "
                        f"applies to a block that every leaf replicates")
    if new_blocks:
        _insert_copies(level, t, inside, new_blocks)
    if remove:
        last = [n for n in graph.nodes if t.container in node_module_paths(n)][-1]
        keep = f"{t.container}.{t.names[len(t.names) - remove - 1]}"
        last.replace_all_uses_with(_nodes_of(graph, keep)[-1])
        graph.eliminate_dead_code()
        level.delete_all_unused_submodules()
    graph.lint()
    level.recompile()


def _under(target: object, path: str) -> bool:
    return isinstance(target, str) and (target == path or target.startswith(path + "."))


def _nodes_of(graph: fx.Graph, path: str) -> list[fx.Node]:
    """The nodes that run inside module ``path`` (its parameters read with ``get_attr`` included)."""
    return [n for n in graph.nodes if path in node_module_paths(n) or (n.op == "get_attr" and _under(n.target, path))]


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
    cursor, prev, created = out_node, out_node, set()
    for name, blk in zip(names, new_blocks):
        level.add_submodule(prefix + name, blk)
        if item is not None:
            with graph.inserting_after(cursor):
                prev = cursor = graph.call_function(operator.getitem, (prev, item))
            created.add(prev)
        env = {hidden: prev}
        for node in inside:
            with graph.inserting_after(cursor):
                new = graph.node_copy(node, lambda a, env=env: env.get(a, a))
            _retarget(new, t.block, prefix + name)
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
        cont = model.get_submodule(t.container) if t.container else model
        items = list(cont._modules.items())
        if extra > 0:
            names, renames = t.copy_names(extra)
            block = items[t.index][1]
            new = OrderedDict()
            for i, (k, m) in enumerate(items):
                new[renames.get(k, k)] = m
                if i == t.index:
                    new.update((name, copy.deepcopy(block)) for name in names)
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
