"""KDCL (Guo et al., CVPR 2020): separate networks, each on its own distorted input, distil from their ensemble.

No official code; the defaults are those of the two public re-implementations, which agree:

- ``tianlizhang/OKDPH@a562089``, ``src/03_KDCL.py``: lines 40-42 run net ``k`` on its own view
  ``imgs[:, k]``; line 44 ``stable_out = mean_k(out_k).detach()`` (naive mean of the logits);
  lines 47-54 ``loss_k = (1 - alpha) CE(out_k) + alpha T^2 KLDiv_batchmean(log_softmax(out_k / T),
  softmax(stable_out / T))``; ``--alpha 0.5`` and ``--T 4.0`` (lines 130-131), two ResNet-32s (line
  114), per-network augmentation seeds (lines 141-148: ``hflip+rot_seed`` on CIFAR-100).
- ``shaoeric/Online-Knowledge-Distillation-via-Collaborative-Learning@1ba5461``, ``train.py``:
  lines 63-85, the same loss (``--T 4.0``, ``--alpha 0.5``, lines 17-19), two networks that may
  differ (``--model_names``), each on its own transformed copy of the image (``data.py``).

Tree: ``split="<input>"`` - no shared trunk, ``branches`` = 2 whole networks (KDCL's peers are
separate networks; any ``split=`` gives a shared-trunk variant, which KDCL is not). Different
architectures: build a :class:`~branchify.Cohort` and pass the aggregator to ``OnlineKD`` by hand.
Aggregator: ``ensemble="mean"`` (default, KDCL-Naive as both codes) -
:class:`~branchify.aggregators.Mean` (detached); ``ensemble="linear"`` (KDCL-Linear) -
:class:`~branchify.aggregators.WeightedMean` with ``weights`` (fit them on held-out logits with
:func:`~branchify.aggregators.fit_ensemble_weights`); ``ensemble="min_logit"`` (KDCL-MinLogit, the
paper's form, no public code) - :class:`~branchify.aggregators.MinLogit`. Loss: ``(1 - alpha) CE + alpha T^2 KL``,
``alpha = 0.5``, T = 4, no ramp.

Views: each network sees its own distortion in both codes. That is the data pipeline's job here:
pass ``views=`` (:mod:`branchify.views`, e.g. ``bf.views.crop_flip(4)`` on un-augmented batches, or
``bf.views.stacked()`` for a loader yielding ``[B, K, ...]``); without it every network sees the
same batch. The extra augmentation is part of KDCL's reported gain: compare against a baseline
trained with the same augmentation (docs/methods/kdcl.md).

The formula, defaults, reference code (file and line) and paper-vs-code choices are on ``docs/methods/kdcl.md``
(the documentation site's method page).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..spec import INPUT, Spec
from .common import ENSEMBLE, alpha_loss, as_splits, branches, ensemble
from .options import Built, CommonOptions
from .presets import MethodError, Preset, register_method

ENSEMBLES = {"mean": "KDCL-Naive: mean of the networks' logits (both re-implementations)",
             "linear": "KDCL-Linear: weighted sum of the logits with weights=[...] (fit_ensemble_weights)",
             "min_logit": "KDCL-MinLogit: per class the minimum of z_k[c] - z_k[y] (the paper; needs the labels)"}


@dataclass(frozen=True, kw_only=True)
class KDCLOptions(CommonOptions):
    """KDCL's options: the common ones (T = 4, the CE / KD weights from ``alpha``), the networks and the ensemble."""

    temperature: float = 4.0
    """T = 4: both re-implementations' ``--T 4.0``."""
    ce_weight: float | None = None
    """``None``: ``1 - alpha``."""
    kd_weight: float | None = None
    """``None``: ``alpha``."""
    branches: int = 2
    """Whole networks: the re-implementations' 2."""
    alpha: float = 0.5
    """The CE / KD balance ``(1 - alpha) CE + alpha KD`` (``--alpha 0.5``)."""
    ensemble: str = "mean"
    """The soft target: ``"mean"`` (KDCL-Naive, both codes), ``"linear"`` (KDCL-Linear, with
    ``weights``) or ``"min_logit"`` (KDCL-MinLogit, the paper's form)."""
    weights: list[float] | None = None
    """One weight per network for ``ensemble="linear"`` (:func:`~branchify.aggregators.fit_ensemble_weights`)."""


def build(model: Any, o: KDCLOptions, tracer: Any = None) -> Built:
    splits, chosen = ([INPUT], None) if o.split is None else as_splits(o, 1, model, tracer)
    k = branches(o, 2)
    spec = Spec(splits=splits, fanout=[k], target=o.target, init=o.init)
    kind = ensemble(o, ENSEMBLES)
    if kind != "linear":
        if o.weights is not None:
            raise MethodError(f"weights= is for ensemble='linear'; ensemble={kind!r} takes none")
        teacher = ENSEMBLE[kind]()
    else:
        if o.weights is None or len(o.weights) != k:
            raise MethodError(f"ensemble='linear' needs weights=[...] with one weight per network ({k}); fit them "
                              f"with branchify.aggregators.fit_ensemble_weights(held_out_logits, labels)")
        teacher = ENSEMBLE[kind](o.weights)
    return Built(spec, teacher, alpha_loss(o), chosen)


PRESET = register_method(Preset("kdcl", "KDCL: 2 whole networks (split '<input>'), each on its own view, "
                                        "mean-logit soft target, (1-a) CE + a KD, a = 0.5, T = 4", KDCLOptions, build))
