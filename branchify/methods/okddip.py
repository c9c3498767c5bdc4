"""OKDDip (Chen et al. 2020): auxiliary peers with attention-weighted targets and a group leader.

Tree: ``branches`` = 4 leaves after the last stage: 3 peers + the leader, which is the deployed
(target) leaf. Aggregator: :class:`~branchify.aggregators.PeerAttention` on logits, targets not
detached (the authors' code: the attention learns only through them). ``leader=None`` makes every
leaf a peer (the authors' ``en`` mode). Loss: T = 3, ramp 80 of 300 epochs (``--length 80``).

``space=`` (``"logits"``, the authors' code; ``"prob"``, the paper's Eq. 5) keeps
:class:`~branchify.aggregators.PeerAttention`'s own parameter name: it sets how the one aggregator
mixes, it does not choose the teacher, so it is not an ``ensemble=`` (the naming rule is on
``docs/methods/index.md``).

The formula, defaults, reference code (file and line) and paper-vs-code choices are on ``docs/methods/okddip.md``
(the documentation site's method page).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..aggregators import PeerAttention
from ..schedules import Schedule
from ..spec import Spec
from .common import ONE_RAMP, as_splits, branches, loss_kwargs
from .options import Built, CommonOptions
from .presets import MethodError, Preset, register_method


@dataclass(frozen=True, kw_only=True)
class OKDDipOptions(CommonOptions):
    """OKDDip's options: the common ones (ramp 80 of 300 epochs), the leaves and the peer attention's."""

    ramp: Schedule | int | float | None = ONE_RAMP
    """80 of 300 epochs (the authors' ``--length 80``), as a fraction of the run."""
    branches: int = 4
    """Leaves after the split: 3 peers + the leader."""
    space: str = "logits"
    """What the attention mixes (:class:`~branchify.aggregators.PeerAttention`'s ``space``):
    ``"logits"`` (the authors' code) or ``"prob"`` (softened probabilities, the paper's Eq. 5)."""
    proj_dim: int | None = None
    """Width of the attention's projections (``None``: ``channels // 8``, at least 1)."""
    leader: str | None = "target"
    """``"target"``: the deployed leaf is the group leader (the paper); ``None``: every leaf is a
    peer (the authors' ``en`` mode)."""


def build(model: Any, o: OKDDipOptions, tracer: Any = None) -> Built:
    splits, chosen = as_splits(o, 1, model, tracer)
    spec = Spec(splits=splits, fanout=[branches(o, 2)], target=o.target, init=o.init)
    if o.leader not in ("target", None):
        raise MethodError(f"leader={o.leader!r}: pass 'target' (the deployed leaf leads, the paper's default) "
                          f"or None (no leader, every leaf is a peer: the authors' `en` mode)")
    return Built(spec, PeerAttention(leader=o.leader, proj_dim=o.proj_dim, space=o.space), loss_kwargs(o), chosen)


PRESET = register_method(Preset("okddip", "OKDDip: 3 peers + leader (target leaf), peer attention, not detached",
                                OKDDipOptions, build))
