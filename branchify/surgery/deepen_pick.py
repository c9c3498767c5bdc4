"""Which block AHBF deepens when no ``deepen`` is given, and how many stages the body has.

**The rule.** The model is run once on a synthesised input
(:func:`~branchify.surgery.block_calls.record_calls`). A *candidate* is a module that

- is a child of an ``nn.Sequential`` / ``nn.ModuleList`` (so the exported model can hold copies
  of it), holds a weight matrix or kernel (a lone normalisation layer is no block), runs
  exactly once and runs as itself in the traced graph (not inside a tracer's leaf module);
- starts at or after the last split (every leaf replicates it) and does not contain the split;
- keeps the shape of its main input in that forward (``x.shape == block(x).shape``);
- can start as the identity (:func:`~branchify.surgery.identity.identity_init_how` succeeds on a
  copy, checked on the arguments it received) - with ``deepen_init="standard"`` this one is dropped.

The deepened block is the candidate that starts last in the forward (so of a stage and its last
block, the block): the
last block of a ResNet's ``layer4``, of a Swin or ConvNeXt last stage, the last transformer
layer, the last inverted residual with a skip of a MobileNet. Its copies go right after it; the
deepen key is its container when it is the container's last child (``layer4``: exactly the
ResNet behaviour), else the block itself (``features.11`` before MobileNet's closing 1x1 conv).

**Fallbacks**, in this order, when no candidate qualifies (each is said by ``describe()`` and a
one-time warning; ``DeepenPick.fallback``):

1. *the cut moves back to a residual block*: with the default split, the candidate that starts
   last *before* the cut becomes the split (a RegNet whose last stage is one downsampling block:
   the branches start at the last block of the stage before, which they deepen);
2. *fresh copies of a shape-preserving unit* (``deepen_init="standard"``, what the AHBF authors'
   code builds its deeper branches from): the unit after the cut that ends last, preferring units
   on feature maps or token sequences (more than two dimensions) to the vectors of a classifier
   head. A unit is a shape-preserving container child holding a kernel followed, in an
   ``nn.Sequential``, by the children after it that hold none and keep the shape (a VGG's
   convolution + BatchNorm + ReLU, key ``"features[25:28]"``), or a shape-preserving block called
   with one tensor beside the body's blocks in a module that is no container (GoogLeNet's
   ``inception5a``, wrapped with its copies in an ``nn.Sequential``);
3. *the cut moves back to such a unit* (default split only): ShuffleNet's last stride-1 block when
   the default cut leaves only the closing 1x1 convolution.

Otherwise the error names what works instead (``aux=0``, another preset, ``deepen_container=``).

**Stages.** The number of distinct output shapes among the body's blocks (the body of
:mod:`~branchify.surgery.default_split`) in the same forward: 4 for an ImageNet ResNet
(``layer1..layer4``), 3 for a CIFAR ResNet, 1 for a ViT or BERT.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from ..spec import SpecError
from .block_calls import Call, Calls, record_calls
from .deepen_target import TRANSITION, one_tensor_call, width_change
from .identity import identity_init_how

_CONTAINERS = (nn.Sequential, nn.ModuleList)


@dataclass(frozen=True)
class DeepenPick:
    """The automatically chosen block: its deepen key, its path, how copies start, and the body's stages."""

    key: str
    block: str
    how: str
    stages: int
    init: str = "identity"
    """The ``deepen_init`` the copies need (``"standard"`` after fallback 2 or 3)."""
    split: str | None = None
    """Where the cut moved (fallbacks 1 and 3); ``None``: the split given."""
    fallback: str = ""
    """Why the rule left its first choice, and how to choose otherwise (empty: it did not)."""


def _start_of(calls: dict[str, Call], after: str) -> int:
    starts = [c.start for p, c in calls.items() if p == after or p.startswith(after + ".")]
    return min(starts) if starts else 0


def _kernel(module: nn.Module) -> bool:
    return any(p.dim() >= 2 for p in module.parameters())


def _runs(calls: Calls, path: str, after: str, start: int, before: bool) -> bool:
    """``path`` runs once, as itself, on the chosen side of the split, and does not contain it."""
    call = calls.get(path)
    if call is None or call.count != 1 or after.startswith(path + "."):
        return False
    if getattr(calls, "traced", None) and path not in calls.traced:
        return False
    return call.start < start if before else call.start >= start


def _wrappable(model: nn.Module, calls: Calls, path: str) -> bool:
    """A block whose parent is no container can still be deepened when it is called with one
    tensor, is no container itself and is a block - at least two of its submodules hold
    parameters (a lone convolution is a layer): it is wrapped with its copies in an ``nn.Sequential``."""
    module = model.get_submodule(path)
    layers = sum(1 for _, m in module.named_modules() if any(True for _ in m.parameters(recurse=False)))
    return one_tensor_call(calls[path]) and not isinstance(module, _CONTAINERS) and layers >= 2


def candidates(model: nn.Module, calls: dict[str, Call], after: str, before: bool = False,
               wrap: bool = False) -> list[str]:
    """Shape-preserving blocks that run after ``after`` (``before``: before it), the one that starts
    last first: children of containers, or (``wrap``) blocks whose parent is no container that
    :func:`_wrappable` accepts.

    Examples:
        >>> candidates(net, record_calls(net), "layer4")   # doctest: +SKIP
        ['layer4.1']
    """
    start = _start_of(calls, after)
    found = []
    for path, module in model.named_modules():
        parent_path, _, _ = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        if (not path or isinstance(parent, _CONTAINERS) == wrap or not _runs(calls, path, after, start, before)
                or not _kernel(module) or not calls[path].keeps_shape()):
            continue
        if not wrap or _wrappable(model, calls, path):
            found.append((calls[path].start, path))
    return [p for _, p in sorted(found, reverse=True)]


@dataclass(frozen=True)
class Unit:
    """What fallback 2 copies: its deepen key, the path ``describe()`` names, its first module
    (where a moved split starts), when it ends in the forward and its main input's dimensions."""

    key: str
    block: str
    first: str
    end: int
    dims: int


def _unit_in(calls: Calls, cpath: str, cont: nn.Module, i: int) -> Unit:
    names = list(cont._modules)
    join = (lambda n: f"{cpath}.{n}") if cpath else (lambda n: n)
    last = i
    if isinstance(cont, nn.Sequential) and type(cont).forward is nn.Sequential.forward:
        while last + 1 < len(names):  # the norms, activations and dropouts that follow it
            c = calls.get(join(names[last + 1]))
            if _kernel(cont[last + 1]) or c is None or c.count != 1 or not c.keeps_shape():
                break
            last += 1
    path, call = join(names[i]), calls[join(names[i])]
    if last > i:
        key = f"{cpath}[{i}:{last + 1}]"
        return Unit(key, key, path, calls[join(names[last])].end, call.hidden_in.dim())
    return Unit(cpath if i == len(names) - 1 else path, path, path, call.end, call.hidden_in.dim())


def shape_units(model: nn.Module, calls: Calls, after: str, before: bool = False) -> list[Unit]:
    """Fallback 2's units after ``after`` (``before``: before it), best first (see the module docstring).

    Examples:
        >>> [u.key for u in shape_units(vgg, record_calls(vgg), "features.22")]   # doctest: +SKIP
        ['features[25:28]', 'features[22:25]', 'classifier[3:6]']
    """
    start = _start_of(calls, after)
    found = []
    for cpath, cont in model.named_modules():
        join = (lambda n, cpath=cpath: f"{cpath}.{n}") if cpath else (lambda n: n)
        for i, (name, child) in enumerate(cont._modules.items()):
            path = join(name)
            if (child is None or not _kernel(child) or not _runs(calls, path, after, start, before)
                    or not calls[path].keeps_shape()):
                continue
            if isinstance(cont, _CONTAINERS):
                found.append(_unit_in(calls, cpath, cont, i))
            elif _wrappable(model, calls, path):
                found.append(Unit(path, path, path, calls[path].end, calls[path].hidden_in.dim()))
    # a stage is no unit when its blocks are: copies of the last block of a stage that keeps its shape, not of the stage
    stages = {u.block for u in found if "[" not in u.block and isinstance(model.get_submodule(u.block), _CONTAINERS)
              and any(v.block.startswith((u.block + ".", u.block + "[")) for v in found)}
    blocks = [u for u in found if u.block not in stages]
    return sorted(blocks, key=lambda u: (u.dims > 2, u.end), reverse=True)


def transition_units(model: nn.Module, calls: Calls, after: str) -> list[tuple[str, str]]:
    """Fallback 4's (key, block) pairs, best first: blocks after ``after`` (children of containers, or blocks
    :func:`_wrappable` accepts) that keep their map's size and change its channels (a DenseNet dense
    block), ending last first, each as ``<key>@transition``.

    Examples:
        >>> transition_units(densenet, record_calls(densenet), "features.denseblock4")   # doctest: +SKIP
        [('features.denseblock4@transition', 'features.denseblock4')]
    """
    start = _start_of(calls, after)
    found = []
    for path, module in model.named_modules():
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        if (not path or not _kernel(module) or not _runs(calls, path, after, start, False)
                or not one_tensor_call(calls[path]) or width_change(calls[path]) is None):
            continue
        if isinstance(parent, _CONTAINERS):
            key = parent_path if list(parent._modules)[-1] == name else path
        elif _wrappable(model, calls, path):
            key = path
        else:
            continue
        found.append((calls[path].end, key + TRANSITION, path))
    return [(key, path) for _, key, path in sorted(found, reverse=True)]


def stage_count(calls: dict[str, Call], body_blocks: list[str]) -> int:
    """Distinct output shapes among the body's blocks (see the module docstring).

    Examples:
        >>> stage_count(record_calls(resnet18), ["layer1", "layer2", "layer3", "layer4"])   # doctest: +SKIP
        4
    """
    shapes = {tuple(calls[b].hidden_out.shape) for b in body_blocks
              if b in calls and calls[b].hidden_out is not None}
    return len(shapes)


def _identity_pick(model: nn.Module, calls: Calls, paths: list[str]) -> tuple[str, str, str] | None:
    """``(deepen key, block, how)`` of the first of ``paths`` whose copy can start as the identity."""
    for path in paths:
        how = identity_init_how(copy.deepcopy(model.get_submodule(path)), calls[path])
        if how is not None:
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            last = isinstance(parent, _CONTAINERS) and list(parent._modules)[-1] == name
            return (parent_path if last else path), path, how
    return None


def pick_block(model: nn.Module, after: str, body_blocks: list[str], tracer: fx.Tracer | None = None,
               deepen_init: str = "identity", container: str | None = None, movable: bool = False) -> DeepenPick:
    """The block to deepen after split ``after`` (see the module docstring); ``container`` (a
    user's ``deepen_container``) skips the choice and only counts the stages; ``movable``: the
    split is the default one, so the fallbacks may move it.

    Raises:
        ValueError: the model cannot be run on a synthesised input.
        SpecError: no block qualifies; the message names what would work instead.

    Examples:
        >>> stages = ["layer1", "layer2", "layer3", "layer4"]
        >>> pick_block(torchvision.models.resnet18(), "layer4", stages).block  # doctest: +SKIP
        'layer4.1'
    """
    calls = record_calls(model, None, tracer)
    stages = stage_count(calls, body_blocks)
    if container is not None:
        return DeepenPick(container, container, "", stages)
    name = type(model).__name__
    if deepen_init == "identity":
        found = _identity_pick(model, calls, candidates(model, calls, after))
        if found is not None:
            return DeepenPick(found[0], found[1], found[2], stages)
        found = _identity_pick(model, calls, candidates(model, calls, after, wrap=True))
        if found is not None:
            return DeepenPick(found[0], found[1], found[2], stages, fallback=(
                f"no container after the split {after!r} holds a residual block, so {found[1]} (a block whose "
                f"parent is no container) is deepened: the deeper leaves hold it and its copies in an "
                f"nn.Sequential in its place; pass deepen_container=... to deepen another block"))
        before = candidates(model, calls, after, before=True) + candidates(model, calls, after, True, True)
        found = _identity_pick(model, calls, before) if movable else None
        if found is not None:
            return DeepenPick(found[0], found[1], found[2], stages, split=found[1], fallback=(
                f"no block after the default split {after!r} can start as the identity, so the branches start "
                f"at the last residual block before it, {found[1]}, and deepen it; pass split=... to cut "
                f"elsewhere"))
    why = ("" if deepen_init == "standard" else
           f"no shape-preserving block after the split {after!r} can start as the identity (none has a residual "
           f"branch whose zero silences it: {name} is not a residual network there), so ")
    units = shape_units(model, calls, after)
    moved = not units and movable
    if moved:
        units = shape_units(model, calls, after, before=True)
    if units:
        u = units[0]
        where = (f"the branches start at {u.first} (nothing after the default split {after!r} keeps its shape) "
                 f"and " if moved else "")
        note = "" if not (why or moved) else (
            f"{why}{where}copies of {u.block} start at the architecture's own init (deepen_init='standard', as the "
            f"AHBF authors' code builds its deeper branches); pass deepen_container=<a container or block> to "
            f"deepen another, or aux=0 for leaves of equal depth")
        return DeepenPick(u.key, u.block, "the architecture's own init", stages, init="standard",
                          split=u.first if moved else None, fallback=note)
    grown = transition_units(model, calls, after)
    if grown:
        key, path = grown[0]
        return DeepenPick(key, path, "the architecture's own init", stages, init="standard", fallback=(
            f"no block after the split {after!r} keeps the shape of its input, and {path} only changes its "
            f"channels, so each copy of it starts at the architecture's own init after a fresh transition back "
            f"to its input width (BatchNorm, ReLU, 1x1 convolution: DenseNet's transition without its pooling), "
            f"one more stage at the last stage's resolution (deepen key {key!r}); pass aux=0 for leaves of equal "
            f"depth or another preset (bf.method('one', model))"))
    raise SpecError(f"AHBF found no block after {after!r} that keeps the shape of its input and runs once as "
                    f"itself (in {name} each one there downsamples, widens or concatenates, is shared, "
                    f"or runs inside a tracer's leaf module), so no copies can follow one. Pass aux=0 (4 leaves "
                    f"of equal depth with the hierarchical TAs), use "
                    f"another preset (bf.method('one', model)), or name a block with deepen_container=...")
