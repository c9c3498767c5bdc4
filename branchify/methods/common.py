"""What every preset shares: the generic options, where to split, the ``ensemble=`` names, and option checks."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ..aggregators import Mean, MinLogit, Pairwise, PeerMean, WeightedMean
from ..aggregators.base import Aggregator
from ..surgery.default_split import DefaultSplits, default_splits
from .options import CommonOptions, option_defaults
from .presets import MethodError

ONE_RAMP = 80 / 300
"""ONE's and OKDDip's ramp: 80 of 300 epochs, kept as a fraction so it scales with the run."""

COMMON: dict[str, Any] = option_defaults(CommonOptions)
"""Options every preset accepts (with their generic defaults; presets change some), as a dict: the
fields of :class:`~branchify.methods.options.CommonOptions`. ``model_fn``, ``tracer``,
``feature_node``, ``batched`` and ``init_noise`` are accepted too and go to ``branchify()``."""

ENSEMBLE: dict[str, type[Aggregator]] = {"pairwise": Pairwise, "peer_mean": PeerMean, "mean": Mean,
                                         "linear": WeightedMean, "min_logit": MinLogit}
"""Which teacher the leaves distil from, by name: the one table behind every ``ensemble=`` option
(DML, CL-ILR, KDCL) and the distributed codistillation's ``aggregator=``. One value names one
aggregator everywhere - ``"pairwise"``: each other peer separately, detached; ``"peer_mean"``: the
mean of the *other* leaves, not detached; ``"mean"``: all leaves, detached; ``"linear"``: a
weighted mean (``weights=``); ``"min_logit"``: KDCL-MinLogit. A preset offers some of them
(:func:`ensemble`) and never gives one another meaning (the rule: ``docs/methods/index.md``)."""

LOSS_OPTIONS = ("temperature", "ramp", "ce_weight", "kd_weight", "detach", "teacher", "teacher_weight",
                "teacher_temperature")


def loss_kwargs(o: CommonOptions) -> dict:
    """The options that configure :class:`~branchify.OnlineKD`."""
    return {k: getattr(o, k) for k in LOSS_OPTIONS}


def alpha_loss(o: Any) -> dict:
    """OnlineKD options with ``ce_weight = 1 - alpha`` and ``kd_weight = alpha`` unless the user gave
    the weights explicitly (TSA's and KDCL's CE / KD balance)."""
    a = float(o.alpha)
    if not 0 <= a <= 1:
        raise MethodError(f"alpha={a} must be in [0, 1] (CE weight 1 - alpha, KD weight alpha)")
    kw = loss_kwargs(o)
    kw["ce_weight"] = 1.0 - a if o.ce_weight is None else o.ce_weight
    kw["kd_weight"] = a if o.kd_weight is None else o.kd_weight
    return kw


def branches(o: Any, minimum: int) -> int:
    """The ``branches`` option, validated."""
    k = o.branches
    if isinstance(k, bool) or not isinstance(k, int) or k < minimum:
        raise MethodError(f"branches={k!r} must be an int >= {minimum}")
    return k


def as_splits(o: CommonOptions, levels: int | None, model: nn.Module,
              tracer: Any = None) -> tuple[list[str], DefaultSplits | None]:
    """The ``split`` option as a list of paths, and the default split rule's choice when it was
    ``None`` (:mod:`branchify.surgery.default_split` for ``levels`` levels, tracing with ``tracer``;
    ``None`` when the split was given)."""
    split = o.split
    if split is None:
        try:
            chosen = default_splits(model, levels or 1, tracer)
        except ValueError as exc:
            raise MethodError(f"{exc}; pass split=<module path> (a list of {levels or 1} for this method); "
                              f"branchify.split_points(model) lists the candidates") from None
        return chosen.splits, chosen
    splits = [split] if isinstance(split, str) else list(split)
    if levels is not None and len(splits) != levels:
        raise MethodError(f"split={split!r} gives {len(splits)} split point(s) but this method needs {levels}")
    return splits, None


def choice(o: Any, key: str, choices: dict[str, str]) -> str:
    """Option ``key`` if it is one of ``choices`` (value -> what it means), else an error listing them."""
    value = getattr(o, key)
    if value not in choices:
        listing = "; ".join(f"{c!r} ({what})" for c, what in choices.items())
        raise MethodError(f"{key}={value!r} is unknown; choose {listing}")
    return value


def ensemble(o: Any, offered: Mapping[str, str]) -> str:
    """The ``ensemble`` option if it is one of the values this preset ``offered`` (value -> what it
    is in this preset), else an error listing them; each offered value must be a name of
    :data:`ENSEMBLE`, so the aggregator it builds is ``ENSEMBLE[value]``.

    Examples:
        >>> from types import SimpleNamespace
        >>> ensemble(SimpleNamespace(ensemble="mean"), {"peer_mean": "the authors' code", "mean": "detached"})
        'mean'
        >>> ENSEMBLE["mean"].__name__
        'Mean'
    """
    foreign = [value for value in offered if value not in ENSEMBLE]
    if foreign:
        raise MethodError(f"ensemble values {foreign} name no aggregator of branchify.methods.common.ENSEMBLE "
                          f"({', '.join(ENSEMBLE)}): one value names one aggregator in every preset")
    return choice(o, "ensemble", dict(offered))
