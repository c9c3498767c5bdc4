"""PCL (Wu & Gong, AAAI 2021): peers on their own views, a peer-ensemble teacher on their features,
and temporal-mean (EMA) peers teaching each other; the temporal mean of the target is deployed.

No official code; the defaults are the reproduction
``shaoeric/Peer-Collaborative-Learning-for-Online-Knowledge-Distillation@6afb473`` (its loss is
copied into ``tianlizhang/OKDPH@a562089`` ``src/06_PCL.py`` lines 20-103):

- tree - ``src/models/resnet.py`` lines 154-159 and 207-229: a shared trunk (conv1, layer1,
  layer2) and 3 peers (layer3, pooling, fc); ``split`` defaults to the last stage, ``branches`` 3;
- views - ``src/controller.py`` lines 37-39 and ``resnet.py`` lines 208-210: peer ``k`` (and the
  trunk, once per peer) runs on its own random augmentation ``img_k``: pass ``views=``
  (:mod:`branchify.views`; without it every peer sees the same batch);
- peer-ensemble teacher - ``resnet.py`` lines 161 and 217-219: ``en_fc`` on the concatenated peer
  features (:class:`~branchify.aggregators.FeatureFusion`, part ``pe``), trained with
  ``CE(pred_en)`` (``src/losses/loss_wrapper.py`` line 41) and teaching each peer with
  ``KDLoss(pred_k, en_output.detach())`` (lines 46, 51, 56; ``controller.py`` line 42);
- temporal mean - ``src/utils/ema.py`` lines 3-7 called after every step (``src/trainer.py`` line
  111): an EMA of the whole network, decay 0.999 with the warm-up ``min(1 - 1/(n + 1), 0.999)``,
  run in training mode on the same views (``controller.py`` line 40); peer ``k`` learns from the
  *other* peers' temporal means with ``PMLoss`` (``src/losses/kd_loss.py`` lines 29-41; part
  ``pm``: :class:`~branchify.aggregators.PeerTemporalMean`). A
  :class:`~branchify.temporal.TemporalMean` attached to the model (``model.temporal``) keeps it;
  it is what ``model.export()`` returns (``trainer.py`` lines 150-203 validate and save the mean
  model);
- loss - ``loss_wrapper.py`` lines 37-61: ``CE(en) + sum_k [CE_k + w(e) (KD(en -> k) + PM_k)]``,
  T = 3 (``KDLoss``/``PMLoss`` defaults), all weights 1;
- ramp - ``loss_wrapper.py`` lines 18-22: ``w(e) = 1`` for ``e > 80``, else ``exp(-5 (1 - e / 1)^2)``
  (``lambd = 1`` where the mean-teacher ramp divides by the length 80): ``w(0) = e^-5``,
  ``w(1) = 1``, about 0 for epochs 2..80. That is the default (:class:`PCLRamp`, scaled to the run
  as 80 and 1 of 300 epochs); ``ramp=80/300`` is the paper's sigmoid ramp-up over 80 epochs.

``tianlizhang/OKDPH`` ``src/06_PCL.py`` line 164 calls the EMA with ``global_step=0``, so its
"mean model" is a plain copy of the weights after every step: ``ema_decay=0.0`` reproduces it.

``peer_mean=`` (whose temporal means teach: ``"others"``, ``"own"`` or ``"all"``) is named after
the paper's "peer mean teacher" (part ``pm``), not ``ensemble=``: PCL's ensemble teacher is the
feature-fusion classifier (part ``pe``), which has no variants (the naming rule is on
``docs/methods/index.md``).

The formula, defaults, reference code (file and line) and paper-vs-code choices are on ``docs/methods/pcl.md``
(the documentation site's method page).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..aggregators import Compose, FeatureFusion, PeerTemporalMean
from ..schedules import Schedule, ScheduleError
from ..spec import Spec
from ..temporal import TemporalMean
from .common import as_splits, branches, loss_kwargs
from .options import Built, CommonOptions
from .presets import MethodError, Preset, register_method

REFERENCE_EPOCHS = 300


class PCLRamp(Schedule):
    """The reproduction's ramp: ``w(e) = 1`` for ``e > L``, else ``exp(-5 (1 - e / u)^2)``.

    With ``L = 80`` and ``u = 1`` epochs of a 300-epoch run (``loss_wrapper.py`` lines 18-22), both
    scaled to the run: ``L = 80/300`` and ``u = 1/300`` of ``total_epochs``.

    Examples:
        >>> ramp = PCLRamp()
        >>> [round(ramp(e, 300), 4) for e in (0, 1, 2, 80, 81)]
        [0.0067, 1.0, 0.0067, 0.0, 1.0]
    """

    def __init__(self, length: float = 80 / REFERENCE_EPOCHS, unit: float = 1 / REFERENCE_EPOCHS) -> None:
        if not 0 < length <= 1 or not 0 < unit <= 1:
            raise ScheduleError(f"PCLRamp(length={length}, unit={unit}): both are fractions of the run in (0, 1]")
        self.length = float(length)
        self.unit = float(unit)

    def __call__(self, epoch: float, total_epochs: int | None = None) -> float:
        if total_epochs is None:
            raise ScheduleError("PCLRamp is relative to the run: call okd.set_epoch(epoch, total_epochs)")
        if epoch > self.length * total_epochs:
            return 1.0
        return math.exp(-5.0 * (1.0 - epoch / (self.unit * total_epochs)) ** 2)

    def __repr__(self) -> str:
        return f"PCLRamp(length={self.length:.4g}, unit={self.unit:.4g})"


@dataclass(frozen=True, kw_only=True)
class PCLOptions(CommonOptions):
    """PCL's options: the common ones (the reproduction's ramp), the peers, the temporal mean and what is deployed."""

    ramp: Schedule | int | float | None = PCLRamp()
    """The reproduction's ramp (:class:`PCLRamp`), scaled to the run."""
    branches: int = 3
    """Peers after the split."""
    ema_decay: float = 0.999
    """Decay of the temporal mean (``0.0``: a plain copy after every step, as ``06_PCL.py`` runs it)."""
    ema_warmup: bool = True
    """The decay's warm-up ``min(1 - 1/(n + 1), decay)``."""
    peer_mean: str = "others"
    """Whose temporal means teach peer k (PCL's "peer mean teacher", part ``pm``;
    :class:`~branchify.aggregators.PeerTemporalMean`'s ``whose``): ``"others"``, ``"own"`` or ``"all"``."""
    deploy: str = "temporal"
    """What ``export()`` gives: ``"temporal"`` (the temporal mean of the target, PCL) or ``"live"``
    (the trained weights)."""


DEPLOY = ("temporal", "live")


def build(model: Any, o: PCLOptions, tracer: Any = None) -> Built:
    splits, chosen = as_splits(o, 1, model, tracer)
    spec = Spec(splits=splits, fanout=[branches(o, 2)], target=o.target, init=o.init)
    if o.deploy not in DEPLOY:
        raise MethodError(f"deploy={o.deploy!r} is unknown; choose 'temporal' (export the EMA of the target, "
                          f"PCL) or 'live' (export the trained weights)")
    try:
        ema = TemporalMean(o.ema_decay, warmup=bool(o.ema_warmup), deploy=o.deploy == "temporal")
        teacher = Compose(pe=FeatureFusion(), pm=PeerTemporalMean(o.peer_mean))
    except ValueError as exc:
        raise MethodError(str(exc)) from None
    # ema.attach runs after branchify (and views): the EMA copies the built tree
    return Built(spec, teacher, loss_kwargs(o), chosen, setup=(ema.attach,))


PRESET = register_method(Preset("pcl", "PCL: shared trunk, 3 peers on their own views, peer-ensemble teacher on "
                                       "concatenated features, EMA peers teaching, the EMA deployed",
                                PCLOptions, build))
