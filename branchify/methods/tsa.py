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

from dataclasses import dataclass, field
from typing import Any

from ..aggregators import Pairwise
from ..spec import Spec
from .common import alpha_loss, as_splits, branches
from .options import Built, CommonOptions
from .presets import Preset, register_method


@dataclass(frozen=True, kw_only=True)
class TSAOptions(CommonOptions):
    """TSA's options: the common ones (the CE / KD weights from ``alpha``), the tree and ``alpha``."""

    ce_weight: float | None = None
    """``None``: ``1 - alpha``."""
    kd_weight: float | None = None
    """``None``: ``alpha``."""
    branches: int = 2
    """M, the children of every node (TSA-M-H) when ``fanout`` is not given."""
    fanout: list | None = None
    """The children of each node per level (:class:`~branchify.Spec`'s ``fanout``); ``None``:
    ``branches`` at every level."""
    alpha: float = 0.5
    """The CE / KD balance: ``(1 - alpha) CE + alpha KD`` (this toolkit's choice: TSA has no public code)."""


@dataclass(frozen=True, kw_only=True)
class UTSAOptions(TSAOptions):
    """U-TSA's options: TSA's with the unbalanced fanout."""

    fanout: list | None = field(default_factory=lambda: [2, [3, 1]])
    """``[2, [3, 1]]``: the reading of the paper's Fig. 2b."""


def _spec(model: Any, o: TSAOptions, tracer: Any) -> tuple[Spec, Any]:
    fanout = o.fanout
    levels = len(fanout) if fanout is not None else (None if o.split is not None else 2)
    splits, chosen = as_splits(o, levels, model, tracer)
    if fanout is None:  # TSA-M-H: M children per node at every level
        fanout = [branches(o, 1)] * len(splits)
    return Spec(splits=splits, fanout=fanout, target=o.target, init=o.init), chosen


def build(model: Any, o: TSAOptions, tracer: Any = None) -> Built:
    spec, chosen = _spec(model, o, tracer)
    return Built(spec, Pairwise(), alpha_loss(o), chosen)


PRESET = register_method(Preset("tsa", "TSA-2-3: splits at the last two stages, fanout [2, 2], pairwise KL",
                                TSAOptions, build))
U_PRESET = register_method(Preset("u_tsa", "U-TSA: unbalanced fanout [2, [3, 1]], pairwise KL",
                                  UTSAOptions, build))
