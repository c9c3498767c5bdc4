"""ONE (Lan et al. 2018): a shared trunk, K leaves after the last stage, a gated teacher.

Tree: ``split`` (default: the last stage) with ``branches`` leaves (3). Aggregator:
:class:`~branchify.aggregators.Gate` (teacher detached inside the KL, as the official code).
Loss: T = 3, the KD terms ramped over 80 of 300 epochs (the official code's ``--consistency_rampup
80``, always on), scaled to the run length.

The formula, defaults, reference code (file and line) and paper-vs-code choices are on ``docs/methods/one.md``
(the documentation site's method page).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..aggregators import Gate
from ..schedules import Schedule
from ..spec import Spec
from .common import ONE_RAMP, as_splits, branches, loss_kwargs
from .options import Built, CommonOptions
from .presets import Preset, register_method


@dataclass(frozen=True, kw_only=True)
class ONEOptions(CommonOptions):
    """ONE's options: the common ones (ramp at 80 of 300 epochs) and ``branches``."""

    ramp: Schedule | int | float | None = ONE_RAMP
    """80 of 300 epochs (the official code's ``--consistency_rampup 80``), as a fraction of the run."""
    branches: int = 3
    """Leaves after the split (the paper's 3)."""


def build(model: Any, o: ONEOptions, tracer: Any = None) -> Built:
    splits, chosen = as_splits(o, 1, model, tracer)
    spec = Spec(splits=splits, fanout=[branches(o, 1)], target=o.target, init=o.init)
    return Built(spec, Gate(), loss_kwargs(o), chosen)


PRESET = register_method(Preset("one", "ONE: shared trunk, 3 leaves, gated teacher (detached), ramp 80/300",
                                ONEOptions, build))
