"""DML (Zhang et al. 2018): whole networks as peers, each distilling from the others.

Tree: ``split="<input>"`` - no shared trunk, ``branches`` = 2 whole networks (any split gives a
shared-trunk variant). Aggregator: :class:`~branchify.aggregators.Pairwise` (every other peer
teaches, weight 1/(K-1), detached: the DML paper and its code); ``ensemble="peer_mean"`` is OKDDip's
DML teacher (the mean of the other peers' logits, not detached). Loss: T = 1 (the DML paper), no ramp.
OKDDip's ``train_DML.py`` also runs 4 networks at T = 3 (with T^2): its baseline as the script runs
it is ``bf.method("dml", net, ensemble="peer_mean", branches=4, temperature=3.0)``.

``ensemble=`` was formerly ``kd=`` (the former name still works, with a ``DeprecationWarning``);
its values name aggregators as in every preset (:data:`~branchify.methods.common.ENSEMBLE`).

The formula, defaults, reference code (file and line) and paper-vs-code choices are on ``docs/methods/dml.md``
(the documentation site's method page).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..spec import INPUT, Spec
from .common import ENSEMBLE, as_splits, branches, ensemble, loss_kwargs
from .options import Built, CommonOptions, Renamed
from .presets import Preset, register_method

ENSEMBLES = {"pairwise": "DML's paper: every other peer teaches, detached",
             "peer_mean": "mean of the other peers, not detached: OKDDip's DML"}


@dataclass(frozen=True, kw_only=True)
class DMLOptions(CommonOptions):
    """DML's options: the common ones (T = 1) and the peers' number and teacher."""

    temperature: float = 1.0
    """T = 1: the DML paper (OKDDip's DML baseline uses 3)."""
    branches: int = 2
    """Whole networks (peers): the paper's 2."""
    ensemble: str = "pairwise"
    """What each peer distils from: ``"pairwise"`` (every other peer, separately, detached: the DML
    paper and its code) or ``"peer_mean"`` (the mean of the other peers' logits, not detached:
    OKDDip's DML). Formerly ``kd=``."""


def build(model: Any, o: DMLOptions, tracer: Any = None) -> Built:
    splits, chosen = ([INPUT], None) if o.split is None else as_splits(o, 1, model, tracer)
    spec = Spec(splits=splits, fanout=[branches(o, 2)], target=o.target, init=o.init)
    teacher = ENSEMBLE[ensemble(o, ENSEMBLES)]()
    return Built(spec, teacher, loss_kwargs(o), chosen)


PRESET = register_method(Preset("dml", "DML: 2 whole networks (split '<input>'), pairwise KL, T = 1",
                                DMLOptions, build, renamed={"kd": Renamed("ensemble")}))
