"""OKDDip (Chen et al. 2020): auxiliary peers with attention-weighted targets and a group leader.

Tree: ``branches`` = 4 leaves after the last stage: 3 peers + the leader, which is the deployed
(target) leaf. Aggregator: :class:`~branchify.aggregators.PeerAttention` on logits, targets not
detached (the authors' code: the attention learns only through them). ``leader=None`` makes every
leaf a peer (the authors' ``en`` mode). Loss: T = 3, ramp 80 of 300 epochs (``--length 80``).

The formula, defaults, reference code (file and line) and paper-vs-code choices are on ``docs/methods/okddip.md``
(the documentation site's method page).
"""
from __future__ import annotations

from ..aggregators import PeerAttention
from ..spec import Spec
from .common import COMMON, ONE_RAMP, as_splits, branches, loss_kwargs
from .registry import MethodError, Preset, register_method

DEFAULTS = {**COMMON, "branches": 4, "ramp": ONE_RAMP, "space": "logits", "proj_dim": None, "leader": "target"}


def build(model, o):
    spec = Spec(splits=as_splits(o, 1, model), fanout=[branches(o, 2)], target=o["target"], init=o["init"])
    if o["leader"] not in ("target", None):
        raise MethodError(f"leader={o['leader']!r}: pass 'target' (the deployed leaf leads, the paper's default) "
                          f"or None (no leader, every leaf is a peer: the authors' `en` mode)")
    return spec, PeerAttention(leader=o["leader"], proj_dim=o["proj_dim"], space=o["space"]), loss_kwargs(o)


PRESET = register_method(Preset("okddip", "OKDDip: 3 peers + leader (target leaf), peer attention, not detached",
                                DEFAULTS, build))
