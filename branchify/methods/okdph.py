"""OKDPH (Zhang et al., CVPR 2023): students of one architecture, a hybrid-weight model mixed from
their parameters every batch, fused back into them on a schedule.

Defaults are the official code, ``tianlizhang/OKDPH@a562089``:

- ``src/OKDPH.py`` lines 163-165: two ResNet-32s built as whole networks with the *same* init
  (``--diff_init`` off: line 119-121 loads the first network's weights into the others) - here
  ``split="<input>"``, ``branches=2``, ``init="copy"``.
- lines 33-47 (``update_hwm``): every batch the hybrid is the mean of the students' state dicts
  (``--hwm mean``, line 183; ``coefficients="dirichlet"`` draws Dirichlet(1, ..., 1) weights, the
  code's other choice, whose ``np.random.dirichlet([[1, 1]])`` call cannot run as written);
  line 46 *copies* the mixture into a separate network, so no gradient of the hybrid's loss
  reaches the students (``hybrid_grad=False``; ``True`` is the paper's differentiable mixture).
- lines 75-88: ``stable_out = mean(students' and hybrid's logits).detach()``; student ``j``
  minimises ``omega * CE_j + (1 - omega) * CE(hybrid) + beta * T^2 * KL(stable_out || student_j)``
  with ``--omega 0.8``, ``--beta 0.8``, ``--T 4.0`` (lines 180-185); the total here is the sum over
  the students (each student's gradient is its own loss's), so the hybrid's CE weighs
  ``N * (1 - omega)`` (:class:`~branchify.OnlineKD`'s ``ce_weights``), a constant unless
  ``hybrid_grad``. No ramp.
- lines 50-58, 101-103 and 137-141 (``fusion``): every ``--interval 1_epoch`` (line 184) each
  student becomes ``gamma * hybrid + (1 - gamma) * student`` with ``--gamma 0.5`` (line 182); the
  hybrid fused is the one built at the last batch, with the BatchNorm statistics its own forward
  updated. ``src/OKDPH.sh`` tunes these per setting (CIFAR-100 ResNet-32: ``--omega 1.0 --beta 0.5
  --gamma 1.0 --interval 5_batch``, line 18); pass them as overrides.

Views: each student sees its own augmentation in the code and the hybrid another one (lines 72,
196-203): that is the data pipeline's job here - pass ``views=`` (:mod:`branchify.views`; the
hybrid takes view ``N``). Identical students (``init="copy"``) with no views stay identical, so
building OKDPH that way warns; ``init="auto"`` starts them independently instead.

Deployed: the target student (leaf 0); ``branchify.fusion.soup(model)`` or
``model.fusion.model`` give the averaged / hybrid network (the code reports the best of all).

The formula, defaults, reference code (file and line) and paper-vs-code choices are on ``docs/methods/okdph.md``
(the documentation site's method page).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from ..aggregators import HybridTeacher
from ..hybrid import WeightFusion
from ..spec import INPUT, Spec
from .common import as_splits, branches, loss_kwargs
from .options import Built, CommonOptions
from .presets import MethodError, Preset, register_method


@dataclass(frozen=True, kw_only=True)
class OKDPHOptions(CommonOptions):
    """OKDPH's options: the common ones (same-init students, T = 4, CE / KD weights from ``omega`` and
    ``beta``), the students and the hybrid-weight model's."""

    init: str = "copy"
    """The students start identical (the code's ``--diff_init`` off); ``"auto"``: independently."""
    temperature: float = 4.0
    """T = 4 (``--T 4.0``)."""
    ce_weight: float | None = None
    """``None``: ``omega``."""
    kd_weight: float | None = None
    """``None``: ``beta``."""
    branches: int = 2
    """Students (whole networks): the code's 2."""
    omega: float = 0.8
    """Students' CE x omega, the hybrid's x ``N (1 - omega)`` (``--omega 0.8``)."""
    beta: float = 0.8
    """Weight of the KD terms (``--beta 0.8``)."""
    gamma: float = 0.5
    """Fusion: each student becomes ``gamma * hybrid + (1 - gamma) * student`` (``--gamma 0.5``)."""
    coefficients: str = "mean"
    """How the hybrid mixes the students' weights: ``"mean"`` (``--hwm mean``) or ``"dirichlet"``."""
    fuse_every: str | None = "1_epoch"
    """How often the hybrid is fused back (``--interval 1_epoch``): ``"<k>_batch"``, ``"<k>_epoch"``
    or ``None`` (never)."""
    hybrid_grad: bool = False
    """``False``: the hybrid is a copy (the code); ``True``: the paper's differentiable mixture."""


def okdph_loss(o: OKDPHOptions, n: int) -> dict:
    """OnlineKD options: students' CE x ``omega``, hybrid's CE x ``N (1 - omega)``, KD x ``beta``."""
    omega, beta = float(o.omega), float(o.beta)
    if not 0.0 <= omega <= 1.0:
        raise MethodError(f"omega={omega} must be in [0, 1] (students' CE x omega, the hybrid's x (1 - omega))")
    if beta < 0:
        raise MethodError(f"beta={beta} must be >= 0 (the weight of the KD terms)")
    kw = loss_kwargs(o)
    kw["ce_weight"] = omega if o.ce_weight is None else o.ce_weight
    kw["kd_weight"] = beta if o.kd_weight is None else o.kd_weight
    kw["ce_weights"] = {"hybrid": n * (1.0 - omega)}
    return kw


def build(model: Any, o: OKDPHOptions, tracer: Any = None) -> Built:
    splits, chosen = ([INPUT], None) if o.split is None else as_splits(o, 1, model, tracer)
    n = branches(o, 2)
    spec = Spec(splits=splits, fanout=[n], target=o.target, init=o.init)
    fusion = WeightFusion(o.coefficients, grad=bool(o.hybrid_grad), gamma=o.gamma,
                          fuse_every=o.fuse_every)  # validated before anything is built

    def attach(branched) -> None:
        fusion.attach(branched)
        if branched.views is None and spec.init == "copy":
            warnings.warn("OKDPH's students start identical (init='copy', the official code) and differ only by "
                          "their inputs; without views= they stay identical. Pass views= (e.g. "
                          "branchify.views.crop_flip()) or init='auto'", UserWarning, stacklevel=4)

    return Built(spec, HybridTeacher(), okdph_loss(o, n), chosen, setup=(attach,))


PRESET = register_method(Preset("okdph", "OKDPH: 2 whole networks + their hybrid-weight model (mean of the "
                                         "weights) as a teacher, fused back every epoch, T = 4",
                                OKDPHOptions, build))
