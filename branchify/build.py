"""``branchify(model, spec)``: trace, cut, replicate, initialise - and return a :class:`BranchedModel`."""
from __future__ import annotations

import copy
import warnings
from typing import Callable

import torch
import torch.fx as fx
from torch import nn

from .model import BranchedModel
from .registry import plugin_for
from .spec import INPUT, Spec, SpecError
from .surgery.batched import BatchedMode, check_mode
from .surgery.deepen import Target, deepen_graph, make_copies, prepare_deepen
from .surgery.init import INIT_DESCRIPTIONS, reinitialise, resolve_init
from .surgery.partition import make_inplace_safe, partition
from .surgery.pretrained import apply_pretrained, describe_pretrained, head_init_method, head_paths
from .surgery.runner import Heads, TreeLayout
from .surgery.tracing import TracedCopy, TraceError, traced_copy
from .tree import Node, TreePath, segment_key


def branchify(model: nn.Module, spec: Spec, *, model_fn: Callable[[], nn.Module] | None = None,
              tracer: fx.Tracer | None = None, feature_node: str | None = None,
              batched: BatchedMode = "auto", init_noise: float = 0.0,
              traced: TracedCopy | None = None) -> BranchedModel:
    """Cut ``model`` at ``spec.splits`` and grow the branch tree ``spec`` describes.

    The model is traced with torch.fx (``tracer`` overrides the default; Hugging Face models get
    the coarse HF tracer). The user's model is never mutated: branchify works on a deep copy.
    Child 0 of every node keeps the original weights (so leaf 0 starts as the original
    model); every other replica is re-initialised as ``spec.init`` says.

    Args:
        model: any fx-traceable model whose forward returns logits.
        spec: the tree (:class:`~branchify.spec.Spec`).
        model_fn: factory for a fresh model of the same architecture: replicas then start
            from the architecture's own init (``init="donor"``, chosen by ``"auto"``).
        tracer: an ``fx.Tracer`` (e.g. :class:`branchify.Tracer` with leaf modules).
        feature_node: fx node name or module path whose output is the "features" (default:
            the input of the final Linear).
        batched: run structurally identical sibling replicas as one vmapped call: ``"auto"``
            (on CUDA, where it is faster; one call per replica elsewhere), ``True`` or ``False``.
            Only the execution changes (see :attr:`BranchedModel.batched`).
        init_noise: ``init="pretrained"`` only: noise (x each tensor's std) on replicas off leaf 0's path.
        traced: a :func:`~branchify.surgery.tracing.traced_copy` of ``model`` made with the same
            ``tracer`` (the default split's, ``DefaultSplits.traced``): cut instead of copying and
            tracing the model again. It must be made from the model as it is now.

    Examples:
        >>> net = torchvision.models.resnet18(num_classes=10)
        >>> bm = branchify(net, Spec(splits=["layer3", "layer4"], fanout=[2, 2]))
        >>> [z.shape for z in bm(torch.randn(2, 3, 32, 32)).logits]   # doctest: +SKIP
        [torch.Size([2, 10])] * 4
    """
    if not isinstance(spec, Spec):
        raise TypeError(f"spec must be a branchify.Spec, got {type(spec).__name__}")
    check_mode(batched)
    plugin = plugin_for(model)
    if model_fn is None and plugin is not None and plugin.model_fn is not None:
        model_fn = plugin.model_fn(model)
    how, detected = _resolve_init(spec, model, model_fn, plugin, init_noise)
    targets = prepare_deepen(model, spec.deepen, tracer)
    if traced is None:
        traced = traced_copy(model, tracer)
    elif not traced.made_from(model, tracer):
        raise TraceError("traced= is a copy of another model or was traced with another tracer; pass the "
                         "traced_copy(model, tracer) of this model and tracer, or leave traced=None")
    work, gm = traced.work, traced.graph
    was_training = work.training
    part = partition(gm, spec.splits, feature_node)
    sd_orig = work.state_dict()
    part.unexecuted = _unexecuted(sd_orig, part.levels)
    if part.unexecuted:
        warnings.warn(f"{len(part.unexecuted)} state_dict entries belong to modules the forward never "
                      f"runs ({part.unexecuted[:5]}...); export fills them from the original model",
                      stacklevel=2)
    unexecuted = {k: sd_orig[k] for k in part.unexecuted}
    nodes = list(spec.nodes())  # the one walk over the tree; every step below reads this list
    leaf_paths = [n.path for n in nodes if n.leaf is not None]
    children: dict[TreePath, list[TreePath]] = {n.path: [] for n in nodes}
    for n in nodes[1:]:
        children[n.parent].append(n.path)
    segments = _grow(part.levels, nodes, spec, how, work, model_fn, targets)
    init_used = _init_used(how, segments, leaf_paths, gm, part, work, model_fn, plugin, init_noise, detected)
    _retie(segments, nodes, part.tied)
    unfrozen = _unfreeze_reinitialised(segments, nodes, how)
    _warn_identical_replicas(segments, nodes, how)
    if spec.splits[0] == INPUT:
        make_inplace_safe(part.levels[0])
    skeleton, nonpersistent = _skeleton_of(model)
    layout = TreeLayout(level_inputs=part.level_inputs, cut_names=part.cut_names,
                        heads=Heads(part.logits_name, part.features_name, part.feature_map_name),
                        grad_scale=[spec.grad_scale.get(s, 1.0) for s in spec.splits],
                        children=children, leaf_paths=leaf_paths)
    bm = BranchedModel(spec, segments, layout, part.model_inputs, skeleton, nonpersistent, unexecuted,
                       init_used=init_used, tied={k: sorted(v) for k, v in part.tied.items()},
                       unfrozen=unfrozen, batched=batched,
                       final_linear_in=part.final_linear.in_features if part.final_linear is not None else None)
    bm.deepened = {key: t.report() for key, t in targets.items()}  # describe() names the copied blocks
    bm.train(was_training)
    return bm


def _unexecuted(sd_orig: dict[str, torch.Tensor], levels: list[fx.GraphModule]) -> list[str]:
    """The model's state_dict entries no level holds: fx keeps only the modules a trace calls, so
    the modules the forward never runs (GoogLeNet's and Inception's aux heads, traced in eval
    mode) are found against the model itself."""
    used = {k for level in levels for k in level.state_dict()}
    return [k for k in sd_orig if k not in used]


def _grow(levels: list[fx.GraphModule], nodes: list[Node], spec: Spec, how: str, work: nn.Module,
          model_fn: Callable[[], nn.Module] | None, targets: dict[str, Target]) -> dict[str, fx.GraphModule]:
    """One segment per node: the trunk is level 0 itself, every other node a copy of its level.

    Child 0 keeps the original weights; the other replicas are re-initialised (``init="pretrained"``
    re-initialises only the heads, later); leaves get their ``deepen`` blocks.
    """
    segments: dict[str, fx.GraphModule] = {}
    for node in nodes:
        if node.level == 0:
            segments[node.key] = levels[0]
            continue
        replica = copy.deepcopy(levels[node.level])
        if not node.is_child0 and how != "pretrained":
            reinitialise(replica, how, original=work, model_fn=model_fn)
        make_inplace_safe(replica)
        if node.leaf is not None:
            _apply_deepen(replica, spec, node.leaf, work, how, model_fn, targets)
        segments[node.key] = replica
    return segments


def _retie(segments: dict[str, fx.GraphModule], nodes: list[Node], tied: dict[str, dict[int, list[str]]]) -> None:
    """Keep parameters that the original model shares across a cut shared.

    A module (or weight) that runs both before and after a cut - a tied embedding and LM head, a
    block reused later - is read by several levels. Every copy after the first level that reads it
    is replaced by that level's parameter on the same root-to-leaf path, so one tensor trains, the
    leaf computes what the original model would, and ``export()`` reproduces it.
    """
    for names in tied.values():
        first = min(names)
        for node in nodes:
            if node.level == first or node.level not in names:
                continue
            source = segments[segment_key(node.path[:first])].get_parameter(names[first][0])
            for name in names[node.level]:
                owner, _, attr = name.rpartition(".")
                segments[node.key].get_submodule(owner)._parameters[attr] = source


def _unfreeze_reinitialised(segments: dict[str, fx.GraphModule], nodes: list[Node], how: str) -> list[str]:
    """Re-initialised replicas train, whatever the original's ``requires_grad``.

    A frozen part of the original (a fine-tuning setup freezing the backbone) keeps its flags in
    the trunk and in every child 0, which hold the original weights; a re-initialised replica of it
    holds random weights, useless if frozen, so its parameters are made trainable. Returns the
    segment keys that were unfrozen (``describe()`` lists them).
    """
    if how in ("copy", "pretrained"):  # pretrained: copies keep their weights and their flags
        return []
    shared: set[int] = set()
    unfrozen = []
    for node in nodes:  # the trunk first, then a child 0 before its siblings
        if node.is_child0:
            shared.update(id(p) for p in segments[node.key].parameters())
            continue
        frozen = [p for p in segments[node.key].parameters() if not p.requires_grad and id(p) not in shared]
        if frozen:
            for p in frozen:
                p.requires_grad_(True)
            unfrozen.append(node.key)
    return unfrozen


def _warn_identical_replicas(segments: dict[str, fx.GraphModule], nodes: list[Node], how: str) -> None:
    """Identical siblings get identical gradients and never diverge: say so loudly.

    Re-initialised replicas can still come out identical to child 0, e.g. when ``model_fn``
    re-seeds the global RNG before building its model.
    """
    if how in ("copy", "pretrained"):  # pretrained: apply_pretrained warns when leaves start identical
        return
    for node in nodes:
        if node.is_child0:
            continue
        sibling = segment_key(node.parent + (0,))
        mine, first = segments[node.key], segments[sibling]
        if any(p.is_meta for p in mine.parameters()):
            return  # a model on the meta device has no values to compare
        theirs = dict(first.named_parameters())
        params = dict(mine.named_parameters())
        if params and params.keys() == theirs.keys() and all(
                torch.equal(p, theirs[k]) for k, p in params.items()):
            warnings.warn(f"replica {node.key} starts with exactly the weights of {sibling} (init {how!r}), "
                          f"so the two will stay identical; if model_fn seeds the random generator, remove the "
                          f"seeding", stacklevel=3)


def _apply_deepen(replica: fx.GraphModule, spec: Spec, leaf: int, work: nn.Module, how: str,
                  model_fn: Callable[[], nn.Module] | None, targets: dict[str, Target]) -> None:
    fresh = {"copy": "shuffle", "pretrained": "donor" if model_fn is not None else "shuffle"}.get(how, how)

    def reinit(blk: nn.Module, src: str) -> None:
        reinitialise(blk, fresh, original=work, model_fn=model_fn, prefix_map=lambda k: src + k)

    for key, counts in spec.deepen.items():
        if counts[leaf]:
            t = targets[key]
            new_blocks = make_copies(work, t, max(counts[leaf], 0), reinit, spec.deepen_init)
            deepen_graph(replica, t, new_blocks, max(-counts[leaf], 0))


def _resolve_init(spec: Spec, model: nn.Module, model_fn: Callable[[], nn.Module] | None, plugin,
                  init_noise: float) -> tuple[str, str | None]:
    """The concrete replica init and, when ``"auto"`` chose ``"pretrained"``, the plugin's reason."""
    detected = plugin.pretrained(model) if plugin is not None and plugin.pretrained is not None else None
    how = resolve_init(spec.init, model, model_fn, plugin.init if plugin is not None else None, detected)
    if init_noise and how != "pretrained":
        raise SpecError(f"init_noise={init_noise} perturbs copied pretrained weights, so it needs "
                        f"init='pretrained' (this model's replicas get init={how!r})")
    return how, detected if spec.init == "auto" else None


def _init_used(how: str, segments: dict[str, fx.GraphModule], leaf_paths: list[TreePath], gm: fx.GraphModule, part,
               work: nn.Module, model_fn: Callable[[], nn.Module] | None, plugin, noise: float,
               detected: str | None) -> str:
    """The ``init_used`` line; ``init="pretrained"``: first re-initialise every leaf's task head but leaf 0's."""
    if how != "pretrained":
        return INIT_DESCRIPTIONS[how]
    final = next((name for name, m in gm.named_modules() if m is part.final_linear), None)
    hinted = plugin.head(work) if plugin is not None and plugin.head is not None else None
    head = head_paths(gm, hinted, final)
    how = head_init_method(work, model_fn)
    tied = [n for names in part.tied.values() for level_names in names.values() for n in level_names]
    done = apply_pretrained(segments, leaf_paths, head, how, original=work, model_fn=model_fn,
                            noise=noise, tied=tied)
    return describe_pretrained(head, how, sorted(done), noise, done, detected)


def _skeleton_of(model: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A meta-device deep copy of ``model`` plus its non-persistent buffers (kept real)."""
    nonpersistent = {}
    for mname, m in model.named_modules():
        for b in m._non_persistent_buffers_set:
            if m._buffers.get(b) is not None:
                nonpersistent[f"{mname}.{b}" if mname else b] = m._buffers[b].detach().clone()
    skeleton = copy.deepcopy(model).to("meta")
    return skeleton, nonpersistent
