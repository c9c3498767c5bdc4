"""CL-ILR (Song & Chai 2018) as its only public code computes it (OKDDip's re-implementation).

Tree: ONE's (``branches`` = 3 leaves after the last stage), with the gradient flowing from the
leaves back into the trunk scaled by 1/K (``rescale``; ``ILR`` in ``resnet_one.py`` lines 111-121).
Aggregator: :class:`~branchify.aggregators.PeerMean` - each leaf learns from the mean of the
*other* leaves' logits, not detached, no CE on the teacher (``ensemble="peer_mean"``);
``ensemble="mean"`` (:class:`~branchify.aggregators.Mean`) is the other reading of the paper (all K
leaves, the student included, detached). Loss: T = 3, ONE's ramp (80 of 300 epochs), as
``train_one.py`` runs it.

``ensemble=`` was formerly ``mean=``, with the values ``"others"`` (now ``"peer_mean"``) and
``"all"`` (now ``"mean"``); the former spelling still works, with a ``DeprecationWarning``. Its
values name aggregators as in every preset (:data:`~branchify.methods.common.ENSEMBLE`).

The formula, defaults, reference code (file and line) and paper-vs-code choices are on ``docs/methods/cl_ilr.md``
(the documentation site's method page).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..schedules import Schedule
from ..spec import INPUT, Spec
from .common import ENSEMBLE, ONE_RAMP, as_splits, branches, ensemble, loss_kwargs
from .options import Built, CommonOptions, Renamed
from .presets import Preset, register_method

ENSEMBLES = {"peer_mean": "mean of the other leaves, not detached: the authors' code",
             "mean": "mean of all leaves, the student included, detached"}


@dataclass(frozen=True, kw_only=True)
class CLILROptions(CommonOptions):
    """CL-ILR's options: the common ones (ONE's ramp), the leaves, the trunk rescaling and the teacher."""

    ramp: Schedule | int | float | None = ONE_RAMP
    """ONE's ramp, 80 of 300 epochs, as ``train_one.py`` runs CL-ILR."""
    branches: int = 3
    """Leaves after the split."""
    rescale: bool = True
    """Scale the gradient flowing from the leaves back into the trunk by 1/K (``ILR``)."""
    ensemble: str = "peer_mean"
    """What each leaf distils from: ``"peer_mean"`` (the mean of the *other* leaves, not detached:
    the authors' code) or ``"mean"`` (all K leaves, the student included, detached). Formerly
    ``mean=`` with ``"others"`` / ``"all"``."""


def build(model: Any, o: CLILROptions, tracer: Any = None) -> Built:
    k = branches(o, 2)
    splits, chosen = as_splits(o, 1, model, tracer)
    teacher = ENSEMBLE[ensemble(o, ENSEMBLES)]()
    grad_scale = {splits[0]: 1.0 / k} if o.rescale and splits[0] != INPUT else {}
    spec = Spec(splits=splits, fanout=[k], target=o.target, init=o.init, grad_scale=grad_scale)
    return Built(spec, teacher, loss_kwargs(o), chosen)


PRESET = register_method(Preset(
    "cl_ilr", "CL-ILR: ONE's tree, mean of the other leaves (not detached), trunk gradient x 1/K", CLILROptions,
    build, renamed={"mean": Renamed("ensemble", {"others": "peer_mean", "all": "mean"})}))
