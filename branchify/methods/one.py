"""ONE (Lan et al. 2018): a shared trunk, K leaves after the last stage, a gated teacher.

Tree: ``split`` (default: the last stage) with ``branches`` leaves (3). Aggregator:
:class:`~branchify.aggregators.Gate` (teacher detached inside the KL, as the official code).
Loss: T = 3, the KD terms ramped over 80 of 300 epochs (the official code's ``--consistency_rampup
80``, always on), scaled to the run length.

The formula, defaults, reference code (file and line) and paper-vs-code choices are on ``docs/methods/one.md``
(the documentation site's method page).
"""
from __future__ import annotations

from ..aggregators import Gate
from ..spec import Spec
from .common import COMMON, ONE_RAMP, as_splits, branches, loss_kwargs
from .registry import Preset, register_method

DEFAULTS = {**COMMON, "branches": 3, "ramp": ONE_RAMP}


def build(model, o):
    spec = Spec(splits=as_splits(o, 1, model), fanout=[branches(o, 1)], target=o["target"], init=o["init"])
    return spec, Gate(), loss_kwargs(o)


PRESET = register_method(Preset("one", "ONE: shared trunk, 3 leaves, gated teacher (detached), ramp 80/300",
                                DEFAULTS, build))
