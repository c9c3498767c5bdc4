"""DML (Zhang et al. 2018): whole networks as peers, each distilling from the others.

Tree: ``split="<input>"`` - no shared trunk, ``branches`` = 2 whole networks (any split gives a
shared-trunk variant). Aggregator: :class:`~branchify.aggregators.Pairwise` (every other peer
teaches, weight 1/(K-1), detached: the DML paper and its code); ``kd="peer_mean"`` is OKDDip's DML
(the mean of the other peers' logits, not detached). Loss: T = 1 (the DML paper), no ramp.

The formula, defaults, reference code (file and line) and paper-vs-code choices are on ``docs/methods/dml.md``
(the documentation site's method page).
"""
from __future__ import annotations

from ..aggregators import Pairwise, PeerMean
from ..spec import INPUT, Spec
from .common import COMMON, as_splits, branches, choice, loss_kwargs
from .registry import Preset, register_method

DEFAULTS = {**COMMON, "branches": 2, "temperature": 1.0, "kd": "pairwise"}
KINDS = {"pairwise": "DML's paper: every other peer teaches, detached",
         "peer_mean": "mean of the other peers, not detached: OKDDip's DML"}


def build(model, o):
    splits = [INPUT] if o["split"] is None else as_splits(o, 1, model)
    spec = Spec(splits=splits, fanout=[branches(o, 2)], target=o["target"], init=o["init"])
    teacher = Pairwise() if choice(o, "kd", KINDS) == "pairwise" else PeerMean()
    return spec, teacher, loss_kwargs(o)


PRESET = register_method(Preset("dml", "DML: 2 whole networks (split '<input>'), pairwise KL, T = 1",
                                DEFAULTS, build))
