"""CL-ILR (Song & Chai 2018) as its only public code computes it (OKDDip's re-implementation).

Tree: ONE's (``branches`` = 3 leaves after the last stage), with the gradient flowing from the
leaves back into the trunk scaled by 1/K (``rescale``; ``ILR`` in ``resnet_one.py`` lines 111-121).
Aggregator: :class:`~branchify.aggregators.PeerMean` - each leaf learns from the mean of the
*other* leaves' logits, not detached, no CE on the teacher (``mean="others"``); ``mean="all"``
is the other reading of the paper (all K leaves, the student included, detached). Loss: T = 3,
ONE's ramp (80 of 300 epochs), as ``train_one.py`` runs it.

The formula, defaults, reference code (file and line) and paper-vs-code choices are on ``docs/methods/cl_ilr.md``
(the documentation site's method page).
"""
from __future__ import annotations

from ..aggregators import Mean, PeerMean
from ..spec import INPUT, Spec
from .common import COMMON, ONE_RAMP, as_splits, branches, choice, loss_kwargs
from .registry import Preset, register_method

DEFAULTS = {**COMMON, "branches": 3, "ramp": ONE_RAMP, "rescale": True, "mean": "others"}
MEANS = {"others": "mean of the other leaves, not detached: the authors' code",
         "all": "mean of all leaves, the student included, detached"}


def build(model, o):
    k = branches(o, 2)
    splits = as_splits(o, 1, model)
    teacher = PeerMean() if choice(o, "mean", MEANS) == "others" else Mean()
    grad_scale = {splits[0]: 1.0 / k} if o["rescale"] and splits[0] != INPUT else {}
    spec = Spec(splits=splits, fanout=[k], target=o["target"], init=o["init"], grad_scale=grad_scale)
    return spec, teacher, loss_kwargs(o)


PRESET = register_method(Preset(
    "cl_ilr", "CL-ILR: ONE's tree, mean of the other leaves (not detached), trunk gradient x 1/K", DEFAULTS, build))
