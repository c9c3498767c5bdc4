"""AHBF-OKD (Gong et al. 2023): progressively deeper leaves fused into hierarchical teacher assistants.

Tree: ``branches`` = 4 leaves after the last split; leaf m gets ``aux * m`` fresh copies of one
block right after it, starting as the identity by default (``deepen_init="identity"``, see below).
The block is chosen from a forward of the model on a synthesised input
(:mod:`branchify.surgery.deepen_pick`): the shape-preserving residual block after the cut that
starts last - the last block of a ResNet's ``layer4`` (the key is then its container, as the
paper deepens the last stage), of a Swin / ConvNeXt last stage, the last transformer layer, a
MobileNet's last inverted residual with a skip (copies go before the closing 1x1 conv).
Where no such block exists the rule falls back, says so in ``describe()`` and warns once: with
the default split the cut moves back to the last residual block (a RegNet whose last stage is
one downsampling block); else fresh copies (``deepen_init="standard"``, as the authors' code
builds its deeper branches) of the shape-preserving unit after the cut that ends last - a VGG's
convolution + BatchNorm + ReLU, SqueezeNet's last Fire module, GoogLeNet's ``inception5a`` - or,
with the default split, before it (ShuffleNet's last stride-1 block); else a DenseNet's last
dense block, each copy after a fresh transition back to its width.
``deepen_container`` names the container (or block) instead; ``deepen`` gives the whole mapping;
``aux=0`` deepens nothing. ``aux="auto"`` applies the paper's two settings by the body's number
of stages (distinct block output shapes in that forward): its ImageNet ResNets have four stages
and use 2 extra blocks per step, its CIFAR ResNets three and use 4 - so 2 for four or more
stages (ResNet-18/50, Swin, ConvNeXt, MobileNet), 4 otherwise (CIFAR ResNets, ViT, BERT, Llama:
one stage). Aggregator: :class:`~branchify.aggregators.HierarchicalTA`
with the authors'-code term ``lambda1 * KL(TA_m || branch m)`` (``own_ta``). Loss: T = 3, the KD
terms ramped over the whole run (the code's ``--rampup`` = the epoch count), nothing detached.

Defaults chosen by measurement (``lambdas=(1, 1)``, the authors' code's own argparse defaults;
``(4, 2)`` is the paper's, ``(2, 4)`` the README's; ``deepen_init="identity"``):

- Stability (``benchmarks/stability.py``; CIFAR ResNet-20, fixed batch, SGD momentum 0.9, KD at
  full weight): AHBF's loss stacks ``2 lambda1 + lambda2`` KD weights (times T^2) per fusion step
  on the same logits, and deeper leaves built from blocks at their standard init take larger
  effective steps. With (4, 2) or (2, 4) the loss diverged (|logit| in the hundreds to thousands)
  whatever the deepening init, and with standard-init deepening even (1, 1) did; only (1, 1) with
  identity-init deepening trained at lr 0.05 and 0.1.
- Accuracy (``benchmarks/results/ahbf_cpu``: ResNet-14 on 1,000 Fashion-MNIST images at 14x14, 100
  epochs, ``aux=1``, 3 seeds, paired gain over the plain model): (1, 1) +0.48 +- 0.16, (2, 4)
  +0.59 +- 0.21, (4, 2) +0.50 +- 0.47; standard-init deepening (1, 1) +0.44 +- 0.21, (4, 2)
  +0.53 +- 0.49 - the same within one standard error, so the stable combination costs nothing.

The formula, defaults, reference code (file and line) and paper-vs-code choices are on ``docs/methods/ahbf.md``
(the documentation site's method page).
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..aggregators import HierarchicalTA
from ..schedules import Schedule
from ..spec import Spec, SpecError
from ..surgery.deepen_pick import DeepenPick, pick_block
from ..surgery.default_split import DefaultSplits, default_splits
from .common import as_splits, branches, loss_kwargs
from .options import Built, CommonOptions
from .presets import MethodError, Preset, register_method


@dataclass(frozen=True, kw_only=True)
class AHBFOptions(CommonOptions):
    """AHBF's options: the common ones (ramp over the whole run), the leaves, the deepening and the TAs."""

    ramp: Schedule | int | float | None = 1.0
    """Over the whole run (the code's ``--rampup`` = the epoch count)."""
    branches: int = 4
    """Leaves after the split; leaf m is deepened by ``aux * m`` blocks."""
    aux: int | str = "auto"
    """Extra blocks per leaf step, or ``"auto"``: 2 for a body of four or more stages, 4 otherwise
    (the paper's two settings); ``0`` deepens nothing."""
    deepen: dict[str, list[int]] | None = None
    """The whole deepening mapping (:class:`~branchify.Spec`'s ``deepen``) instead of ``aux``'s rule."""
    deepen_container: str | None = None
    """The container (or block inside one, or a block called with one tensor) to deepen; ``None``:
    found from a forward of the model."""
    lambdas: tuple[float, float] = (1.0, 1.0)
    """(lambda1, lambda2) of the TA terms: the authors' argparse defaults (see the module docstring)."""
    own_ta: bool = True
    """Each branch also learns from its own TA (``lambda1 * KL(TA_m || branch m)``, the authors' code)."""
    deepen_init: str = "identity"
    """How the added blocks start: ``"identity"`` (stable, see above) or ``"standard"`` (the authors' code)."""


def _body(model: nn.Module, chosen: DefaultSplits | None, tracer: Any) -> DefaultSplits | None:
    """The default split rule's reading of the model: ``chosen`` if it was made already, else made here
    (``None``: no body; the stage count is then 0, aux 4)."""
    if chosen is not None:
        return chosen
    try:
        return default_splits(model, 1, tracer)
    except ValueError:
        return None


def _deepen(model: nn.Module, splits: list[str], k: int, o: AHBFOptions, tracer: Any, chosen: DefaultSplits | None
            ) -> tuple[dict[str, list[int]], DefaultSplits | None, DeepenPick | None]:
    """``{deepen key: [0, a, 2a, ...]}`` by the rule in the module docstring, the default split
    rule's reading of the model when it was needed (its traced copy is what branchify() then cuts),
    and the automatic pick (``None`` when nothing was picked)."""
    a = o.aux
    if a != "auto" and (isinstance(a, bool) or not isinstance(a, int)):
        raise MethodError(f"aux={a!r} must be an int (extra blocks per leaf step) or 'auto'")
    if a == 0:
        return {}, chosen, None
    key = o.deepen_container
    if key is None or a == "auto":
        body = _body(model, chosen, tracer)
        try:
            pick = pick_block(model, splits[-1], body.blocks if body else [], tracer, o.deepen_init, key,
                              movable=o.split is None)
        except SpecError as exc:
            raise MethodError(str(exc)) from None
        except ValueError as exc:
            raise MethodError(f"AHBF could not find the block to deepen: {exc}. Name it with deepen_container="
                              f"<a container of blocks, or a block inside one> and aux=<int>") from None
        a = (2 if pick.stages >= 4 else 4) if a == "auto" else a
        return {pick.key: [a * m for m in range(k)]}, body, pick
    return {key: [a * m for m in range(k)]}, chosen, None


_WARNED: set[tuple[str, str]] = set()
"""(model class, fallback) pairs already warned about: each fallback warns once per process."""


def _fall_back(model: nn.Module, pick: DeepenPick) -> None:
    """Warn (once per model class and fallback) that the rule left its first choice, and how to choose."""
    if (type(model).__name__, pick.fallback) not in _WARNED:
        _WARNED.add((type(model).__name__, pick.fallback))
        warnings.warn(f"AHBF on {type(model).__name__}: {pick.fallback}", UserWarning, stacklevel=5)


def _noted(key: str, note: str):
    """A setup step: ``describe()`` prints the fallback's note under the deepened block."""
    def setup(bm: Any) -> None:
        bm.deepened[key]["note"] = note
    return setup


def build(model: Any, o: AHBFOptions, tracer: Any = None) -> Built:
    k = branches(o, 2)
    splits, chosen = as_splits(o, 1, model, tracer)
    deepen, read, pick = (o.deepen, chosen, None) if o.deepen is not None else _deepen(model, splits, k, o, tracer,
                                                                                      chosen)
    deepen_init, setup = o.deepen_init, ()
    if pick is not None and pick.fallback:
        _fall_back(model, pick)
        deepen_init, setup = pick.init, (_noted(pick.key, pick.fallback),)
        if pick.split is not None:
            splits = [pick.split]
            if chosen is not None:
                chosen = dataclasses.replace(chosen, splits=splits, reason=f"{chosen.reason}; AHBF moved it to "
                                             f"{pick.split}, the last block it can deepen")
    spec = Spec(splits=splits, fanout=[k], target=o.target, init=o.init, deepen=deepen, deepen_init=deepen_init)
    aggregator = HierarchicalTA(lambdas=tuple(o.lambdas), own_ta=o.own_ta)
    return Built(spec, aggregator, loss_kwargs(o), chosen, traced=read.traced if read is not None else None,
                 setup=setup)


PRESET = register_method(Preset("ahbf", "AHBF-OKD: 4 leaves deepened by 0, a, 2a, 3a blocks, hierarchical TAs",
                                AHBFOptions, build))
