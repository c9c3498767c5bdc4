"""TSA / U-TSA (Lin et al. 2022): trees of replicated suffixes with pairwise peer distillation.

Tree: TSA-M-H - splits at the last two stages (default), ``branches`` = M = 2 children per node
(4 leaves, TSA-2-3); ``u_tsa`` uses the unbalanced fanout ``[2, [3, 1]]`` (the paper's Fig. 2b has
no text description; this is its documented reading). Any ``fanout`` can be given. Aggregator:
:class:`~branchify.aggregators.Pairwise` (peers detached). Loss: ``(1 - alpha) CE + alpha KD``
with ``alpha = 0.5`` and T = 3 - this toolkit's choice: TSA has no public code.

The formula, defaults, reference code (file and line) and paper-vs-code choices are on
``docs/methods/tsa.md`` and ``docs/methods/u_tsa.md`` (the documentation site's method pages).
"""
from __future__ import annotations

from ..aggregators import Pairwise
from ..spec import Spec
from .common import COMMON, alpha_loss, as_splits, branches
from .registry import Preset, register_method

DEFAULTS = {**COMMON, "branches": 2, "fanout": None, "alpha": 0.5, "ce_weight": None, "kd_weight": None}


def _spec(model, o):
    fanout = o["fanout"]
    levels = len(fanout) if fanout is not None else (None if o["split"] is not None else 2)
    splits = as_splits(o, levels, model)
    if fanout is None:  # TSA-M-H: M children per node at every level
        fanout = [branches(o, 1)] * len(splits)
    return Spec(splits=splits, fanout=fanout, target=o["target"], init=o["init"])


def build(model, o):
    return _spec(model, o), Pairwise(), alpha_loss(o)


PRESET = register_method(Preset("tsa", "TSA-2-3: splits at the last two stages, fanout [2, 2], pairwise KL",
                                DEFAULTS, build))
U_PRESET = register_method(Preset("u_tsa", "U-TSA: unbalanced fanout [2, [3, 1]], pairwise KL",
                                  {**DEFAULTS, "fanout": [2, [3, 1]]}, build))
