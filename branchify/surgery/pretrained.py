"""Replicas of a pretrained model: copies of the pretrained weights with a fresh task head each.

Re-initialising every replica (``init="donor"``, ``"hf"``, ``"shuffle"``) is right for a model
trained from scratch; for a pretrained one it throws the pretraining away - ONE's peers get a
random last stage, DML's second network is entirely random - and the random peers teach noise
to the pretrained target for much of a short fine-tuning run. ``init="pretrained"`` instead:

* every replica copies the pretrained weights (the trunk is shared anyway);
* the **task head** - the modules that map the network's features to this task's outputs - is
  re-initialised in every leaf except leaf 0, by the architecture's own init where branchify can
  reach it (a ``model_fn`` donor, Hugging Face ``_init_weights``, else each module's
  ``reset_parameters()``, PyTorch's default - what torchvision's classifiers use). The head of a
  model being fine-tuned for a new task is freshly initialised anyway, so the leaves start as
  equally good, different solutions: different heads give different gradients from the first
  step, so the copied backbones diverge. Parameters of the head shared with the rest of the
  network (a language-model head tied to the input embedding) are never re-initialised;
* optionally ``init_noise=s``: Gaussian noise of ``s`` times each tensor's standard deviation is
  added to every copied parameter of every replica except the all-child-0 path (off by default);
* per-branch dropout streams differ anyway (each replica draws its own masks).

The head is the plugin's answer (Hugging Face: every top-level child that is not the base model;
timm: ``pretrained_cfg["classifier"]``), else the final ``nn.Linear`` that produces the logits.

Examples:
    >>> bm, okd = bf.method("one", torchvision.models.resnet18(weights=...), init="pretrained")  # doctest: +SKIP
    >>> print(bm.init_used)                                                                     # doctest: +SKIP
    pretrained: every replica copies the pretrained weights; task head ['fc'] re-initialised ...
"""
from __future__ import annotations

import copy
import warnings
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..spec import SpecError
from ..tree import TreePath, is_original_lineage, lineage, segment_key

HEAD_INITS = {
    "donor": "a fresh model_fn() per replica (the architecture's own init)",
    "hf": "the model's own _init_weights (Hugging Face)",
    "reset": "reset_parameters(), PyTorch's default init",
}


def head_init_method(original: nn.Module, model_fn: Callable[[], nn.Module] | None) -> str:
    """How a replica's head is re-initialised: ``"donor"``, ``"hf"`` or ``"reset"`` (see :data:`HEAD_INITS`).

    Examples:
        >>> head_init_method(nn.Linear(2, 2), None)
        'reset'
    """
    if model_fn is not None:
        return "donor"
    if callable(getattr(original, "_init_weights", None)):
        return "hf"
    return "reset"


def head_paths(model: nn.Module, plugin_head: Sequence[str] | None, final_linear: str | None) -> list[str]:
    """The module paths of ``model``'s task head: the plugin's (those that exist), else the final Linear.

    Examples:
        >>> head_paths(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), None, "2")
        ['2']
    """
    names = dict(model.named_modules())
    found = [p for p in (plugin_head or []) if p in names and any(True for _ in names[p].parameters())]
    if found:
        return found
    return [final_linear] if final_linear else []


def _fresh_copy(module: nn.Module, path: str, how: str, original: nn.Module,
                model_fn: Callable[[], nn.Module] | None) -> nn.Module:
    fresh = copy.deepcopy(module)
    if how == "donor":
        donor = model_fn().state_dict()
        prefix = path + "."
        own = fresh.state_dict()
        missing = [k for k in own if prefix + k not in donor]
        if missing:
            raise SpecError(f"model_fn() builds a model without the head entries {[prefix + k for k in missing][:3]}; "
                            f"model_fn must build the same architecture as the model")
        fresh.load_state_dict({k: donor[prefix + k] for k in own})
    elif how == "hf":
        fresh.apply(original._init_weights)
    else:
        for m in fresh.modules():
            if callable(getattr(m, "reset_parameters", None)):
                m.reset_parameters()
    return fresh


@torch.no_grad()
def reinit_head(segment: nn.Module, paths: Sequence[str], how: str, *, original: nn.Module,
                model_fn: Callable[[], nn.Module] | None = None, skip: Sequence[str] = ()) -> list[str]:
    """Re-initialise the head modules ``paths`` of ``segment`` in place; returns the parameter names set.

    A head parameter that is the same tensor as a parameter outside the head (a tied LM head and
    input embedding) is left alone, so the rest of the network keeps its pretrained weights.
    Head paths the segment does not hold are skipped (a segment before the last cut), and so are
    the parameter names in ``skip``.

    Examples:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3)); w = net[1].weight.clone()
        >>> reinit_head(net, ["1"], "reset", original=net)
        ['1.weight', '1.bias']
        >>> torch.equal(net[1].weight, w)
        False
    """
    modules = dict(segment.named_modules())
    present = [p for p in paths if p in modules]
    in_head = {id(t) for p in present for t in modules[p].parameters()}
    outside = {id(t) for name, t in segment.named_parameters(remove_duplicate=False)
               if not any(name.startswith(p + ".") for p in present)}
    done = []
    for p in present:
        fresh = dict(_fresh_copy(modules[p], p, how, original, model_fn).named_parameters())
        for name, t in modules[p].named_parameters():
            if id(t) in outside or id(t) not in in_head or f"{p}.{name}" in skip:
                continue
            t.copy_(fresh[name])
            done.append(f"{p}.{name}")
        for m in modules[p].modules():
            if isinstance(m, _BatchNorm) and m.track_running_stats:
                m.reset_running_stats()
    return done


@torch.no_grad()
def add_noise(module: nn.Module, scale: float, skip: Sequence[str] = ()) -> int:
    """Add Gaussian noise of ``scale`` x each floating parameter's standard deviation (global RNG).

    ``skip`` names parameters left alone (freshly initialised heads). Returns how many tensors moved.

    Examples:
        >>> _ = torch.manual_seed(0); lin = nn.Linear(4, 4); w = lin.weight.clone()
        >>> add_noise(lin, 0.01), torch.allclose(lin.weight, w, atol=0.05), torch.equal(lin.weight, w)
        (2, True, False)
    """
    if scale < 0:
        raise SpecError(f"init_noise={scale} must be >= 0 (a fraction of each tensor's standard deviation)")
    moved = 0
    for name, p in module.named_parameters():
        if name in skip or not p.is_floating_point() or p.numel() < 2:
            continue
        p.add_(torch.randn_like(p) * (scale * p.detach().float().std().item()))
        moved += 1
    return moved


def looks_trained(model: nn.Module) -> bool:
    """Whether ``model``'s normalisation layers hold trained values: a norm scale/shift or a
    BatchNorm running statistic that is not one constant. Every common init sets them to
    constants (1 and 0; 0 for "zero-init-last" residual norms), so a fresh model gives ``False``
    and a pretrained one (or one trained at all) ``True``; a model without normalisation layers
    gives ``False``.

    Examples:
        >>> net = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
        >>> looks_trained(net)
        False
        >>> _ = net[1].weight.data.copy_(torch.tensor([0.9, 1.1, 1.0])); looks_trained(net)
        True
    """
    for m in model.modules():
        if not ("Norm" in type(m).__name__ or isinstance(m, _BatchNorm)):
            continue
        for t in list(m.parameters(recurse=False)) + [getattr(m, b, None) for b in ("running_mean", "running_var")]:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() > 1 and not t.is_meta:
                flat = t.detach().reshape(-1)
                if not torch.all(flat == flat[0]):
                    return True
    return False


def describe_pretrained(paths: Sequence[str], how: str, leaves: Sequence[int], noise: float,
                        reinitialised: dict[int, list[str]], detected: str | None) -> str:
    """The ``init_used`` line of a model built with ``init="pretrained"`` (what every replica got)."""
    text = "pretrained: every replica copies the pretrained weights"
    if paths and any(reinitialised.values()):
        counts = sorted({len(v) for v in reinitialised.values()})
        text += (f"; task head {list(paths)} re-initialised in leaves {list(leaves)} by {HEAD_INITS[how]} "
                 f"({'/'.join(map(str, counts))} tensors each), leaf 0 keeps the model's own head")
    elif paths and leaves:
        text += (f"; task head {list(paths)} is tied to the rest of the network, so nothing was "
                 f"re-initialised: leaves differ only by dropout" + (" and noise" if noise else ""))
    elif paths:
        text += "; a single leaf keeps the model's own head"
    else:
        text += "; no task head found (no final Linear): leaves differ only by dropout"
    if noise:
        text += f"; every replica off leaf 0's path gets Gaussian noise of {noise:g} x each tensor's std"
    if detected:
        text += (f"\n  chosen automatically: {detected}; an explicit init= (e.g. 'hf', 'donor', 'shuffle') "
                 f"re-initialises whole replicas instead")
    return text


def pretrained_peers(model: nn.Module, n: int = 2, *, head: Sequence[str] | None = None,
                     model_fn: Callable[[], nn.Module] | None = None, init_noise: float = 0.0) -> list[nn.Module]:
    """``n`` network-level peers of a pretrained ``model`` for a :class:`~branchify.Cohort` (DML,
    OKDDip, MD): the treatment ``init="pretrained"`` gives replicas. Peer 0 is an exact copy; every
    other peer copies the pretrained weights with its task head re-initialised (``head``: module
    paths; default: the plugin's head, else the last ``nn.Linear``) and, with ``init_noise``,
    noise on every other parameter. Each peer's ``branchify_init`` attribute says what it got.

    Examples:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> peers = pretrained_peers(net, 2)
        >>> [p.branchify_init for p in peers]   # doctest: +NORMALIZE_WHITESPACE
        ['pretrained weights (copy)', "pretrained weights; head ['3'] re-initialised by reset_parameters(),
         PyTorch's default init"]
    """
    from ..registry import plugin_for

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise SpecError(f"n={n!r} must be an int >= 1 (the number of peers)")
    plugin = plugin_for(model)
    if model_fn is None and plugin is not None and plugin.model_fn is not None:
        model_fn = plugin.model_fn(model)
    if head is None:
        hinted = plugin.head(model) if plugin is not None and plugin.head is not None else None
        linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        head = head_paths(model, hinted, linears[-1] if linears else None)
    else:
        unknown = [p for p in head if p not in dict(model.named_modules())]
        if unknown:
            raise SpecError(f"head={list(head)}: {unknown} are not modules of the model; pass module paths "
                            f"such as {[name for name, _ in model.named_children()][:5]}")
    how = head_init_method(model, model_fn)
    peers = []
    for i in range(n):
        peer = copy.deepcopy(model)
        if i == 0:
            peer.branchify_init = "pretrained weights (copy)"
        else:
            done = reinit_head(peer, head, how, original=model, model_fn=model_fn)
            if init_noise:
                add_noise(peer, init_noise, skip=done)
            peer.branchify_init = (f"pretrained weights; head {list(head)} re-initialised by {HEAD_INITS[how]}"
                                   + (f"; noise {init_noise:g} x std elsewhere" if init_noise else ""))
        peers.append(peer)
    return peers


def apply_pretrained(segments: dict[str, nn.Module], leaf_paths: Sequence[TreePath], head: Sequence[str],
                     how: str, *, original: nn.Module, model_fn: Callable[[], nn.Module] | None,
                     noise: float, tied: Sequence[str] = ()) -> dict[int, list[str]]:
    """Give the replicas of a branched model ``init="pretrained"``'s treatment, in place.

    ``segments`` are keyed by :func:`branchify.tree.segment_key`; every leaf but leaf 0
    gets its head re-initialised in its last segment (so no two leaves start identical, whatever
    the tree), and with ``noise`` every segment off leaf 0's path is perturbed. ``tied`` names
    parameters that are later replaced by a shared one (left alone). Returns leaf -> the parameter
    names re-initialised.

    Examples:
        >>> done = apply_pretrained(bm_segments, spec.leaf_paths(), ["fc"], "reset",
        ...                         original=net, model_fn=None, noise=0.0)   # doctest: +SKIP
    """
    done: dict[int, list[str]] = {}
    for leaf, path in enumerate(leaf_paths):
        if is_original_lineage(path):  # leaf 0 keeps the model's own head
            continue
        seg = segments[segment_key(path)]
        names = reinit_head(seg, head, how, original=original, model_fn=model_fn, skip=tied)
        done[leaf] = names
    if noise:
        node_of = {segment_key(p): p for path in leaf_paths for p in lineage(path)}
        leaf_of = {path: leaf for leaf, path in enumerate(leaf_paths)}
        for key, seg in segments.items():  # in the segments' order, so the noise draws keep theirs
            if not is_original_lineage(node_of[key]):
                add_noise(seg, noise, skip=done.get(leaf_of.get(node_of[key]), []))
    if head and not noise and len(leaf_paths) > 1 and not any(done.values()):
        warnings.warn(f"init='pretrained': the head {list(head)} has no parameter of its own to re-initialise "
                      f"(tied to the rest of the network), so every leaf starts as leaf 0 and only dropout "
                      f"separates them; pass init_noise=0.01 (or an explicit init=) for diverse replicas",
                      stacklevel=3)
    return done
