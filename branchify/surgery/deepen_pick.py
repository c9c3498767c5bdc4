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
from .block_calls import Call, record_calls
from .identity import identity_init_how

_CONTAINERS = (nn.Sequential, nn.ModuleList)


@dataclass(frozen=True)
class DeepenPick:
    """The automatically chosen block: its deepen key, its path, how copies start, and the body's stages."""

    key: str
    block: str
    how: str
    stages: int


def _start_of(calls: dict[str, Call], after: str) -> int:
    starts = [c.start for p, c in calls.items() if p == after or p.startswith(after + ".")]
    return min(starts) if starts else 0


def candidates(model: nn.Module, calls: dict[str, Call], after: str) -> list[str]:
    """Shape-preserving blocks that run after ``after``, the one that starts last first.

    Examples:
        >>> candidates(net, record_calls(net), "layer4")   # doctest: +SKIP
        ['layer4.1']
    """
    start = _start_of(calls, after)
    found = []
    for path, module in model.named_modules():
        parent_path, _, _ = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        call = calls.get(path)
        if (not path or not isinstance(parent, _CONTAINERS) or call is None or call.count != 1
                or call.start < start or after.startswith(path + ".")
                or not any(p.dim() >= 2 for p in module.parameters())
                or (getattr(calls, "traced", None) and path not in calls.traced)):
            continue
        if call.keeps_shape():
            found.append((call.start, path))
    return [p for _, p in sorted(found, reverse=True)]


def stage_count(calls: dict[str, Call], body_blocks: list[str]) -> int:
    """Distinct output shapes among the body's blocks (see the module docstring).

    Examples:
        >>> stage_count(record_calls(resnet18), ["layer1", "layer2", "layer3", "layer4"])   # doctest: +SKIP
        4
    """
    shapes = {tuple(calls[b].hidden_out.shape) for b in body_blocks
              if b in calls and calls[b].hidden_out is not None}
    return len(shapes)


def pick_block(model: nn.Module, after: str, body_blocks: list[str], tracer: fx.Tracer | None = None,
               deepen_init: str = "identity", container: str | None = None) -> DeepenPick:
    """The block to deepen after split ``after`` (see the module docstring); ``container`` (a
    user's ``deepen_container``) skips the choice and only counts the stages.

    Raises:
        ValueError: the model cannot be run on a synthesised input.
        SpecError: no block qualifies; the message names what would work instead.

    Examples:
        >>> stages = ["layer1", "layer2", "layer3", "layer4"]
        >>> pick_block(torchvision.models.resnet18(), "layer4", stages)  # doctest: +SKIP
        DeepenPick(key='layer4', block='layer4.1', how="the scale of its last normalisation layer 'bn2' at 0", stages=4)
    """
    calls = record_calls(model, None, tracer)
    stages = stage_count(calls, body_blocks)
    if container is not None:
        return DeepenPick(container, container, "", stages)
    shaped = candidates(model, calls, after)
    for path in shaped:
        how = "the architecture's own init" if deepen_init == "standard" else identity_init_how(
            copy.deepcopy(model.get_submodule(path)), calls[path])
        if how is not None:
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            last = list(parent._modules)[-1] == name
            return DeepenPick(parent_path if last else path, path, how, stages)
    if shaped:
        raise SpecError(f"AHBF found no block after {after!r} that can start as the identity: the shape-preserving "
                        f"ones ({shaped[:4]}) have no residual branch to silence ({type(model).__name__} is not a "
                        f"residual network). Pass deepen_init='standard' (copies of {shaped[0]} at the "
                        f"architecture's own init, as the AHBF authors' code builds them) or aux=0 (no deepening)")
    raise SpecError(f"AHBF found no block after {after!r} that keeps the shape of its input and runs once as "
                    f"itself (in {type(model).__name__} each one there downsamples, widens or concatenates, is shared, "
                    f"or runs inside a tracer's leaf module), so no copies can follow one. Pass aux=0 (4 leaves "
                    f"of equal depth with the hierarchical TAs), use "
                    f"another preset (bf.method('one', model)), or name a block with deepen_container=...")
