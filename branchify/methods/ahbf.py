"""AHBF-OKD (Gong et al. 2023): progressively deeper leaves fused into hierarchical teacher assistants.

Tree: ``branches`` = 4 leaves after the last stage; leaf m's copy of the stage gets ``aux * m``
extra blocks (fresh copies of its last block; ``aux`` 4 on CIFAR-style nets, 2 on torchvision
ResNets, the paper's CIFAR / ImageNet settings), appended as the identity by default
(``deepen_init="identity"``, see below). Aggregator: :class:`~branchify.aggregators.HierarchicalTA`
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
"""
from __future__ import annotations

from torch import nn

from ..aggregators import HierarchicalTA
from ..spec import Spec
from .common import COMMON, as_splits, branches, loss_kwargs
from .registry import MethodError, Preset, register_method

DEFAULTS = {**COMMON, "branches": 4, "ramp": 1.0, "aux": "auto", "deepen": None, "deepen_container": None,
            "lambdas": (1.0, 1.0), "own_ta": True, "deepen_init": "identity"}


def _container(model: nn.Module, split: str, chosen) -> str:
    """What the deeper leaves lengthen: the split itself when it is a stage of blocks (a ResNet's
    ``layer4``), else - the default split being one block of the body (a ViT layer) - the body."""
    if isinstance(model.get_submodule(split), (nn.Sequential, nn.ModuleList)) or chosen is None:
        return split
    return chosen.body


def build(model, o):
    k = branches(o, 2)
    splits = as_splits(o, 1, model)
    deepen = o["deepen"]
    if deepen is None:
        a = o["aux"]
        if a == "auto":
            a = 2 if isinstance(getattr(model, "layer4", None), nn.Module) else 4
        if isinstance(a, bool) or not isinstance(a, int):
            raise MethodError(f"aux={a!r} must be an int (extra blocks per leaf step) or 'auto'")
        container = o["deepen_container"] or _container(model, splits[-1], o.get("_default_splits"))
        deepen = {container: [a * m for m in range(k)]} if a else {}
    spec = Spec(splits=splits, fanout=[k], target=o["target"], init=o["init"], deepen=deepen,
                deepen_init=o["deepen_init"])
    return spec, HierarchicalTA(lambdas=tuple(o["lambdas"]), own_ta=o["own_ta"]), loss_kwargs(o)


PRESET = register_method(Preset("ahbf", "AHBF-OKD: 4 leaves deepened by 0, a, 2a, 3a blocks, hierarchical TAs",
                                DEFAULTS, build))
