"""Named method presets: one call builds the paper's tree, aggregator and loss around a model.

Example:
    >>> import torchvision, branchify as bf
    >>> model, okd = bf.method("one", torchvision.models.resnet18(num_classes=10))   # doctest: +SKIP
    >>> model, okd = bf.method("tsa", net, split=["layer2", "layer3"], alpha=0.3)    # doctest: +SKIP

Every preset is ``Spec`` template + aggregator + ``OnlineKD`` defaults, taken from METHODS.md:

======== ==================================== =================== ==========================
name     tree (default)                       aggregator          loss defaults
======== ==================================== =================== ==========================
one      3 leaves at the last stage           Gate (detached)     T=3, ramp 80/300 of run
cl_ilr   ONE's tree, grad x 1/K into trunk    Mean (detached)     T=3, ramp 80/300 of run
okddip   4 leaves (leader = target leaf 0)    PeerAttention       T=3, ramp 80/300, not detached
tsa      splits at last two stages, [2, 2]    Pairwise (detached) T=3, CE x (1-a), KD x a, a=0.5
u_tsa    same splits, fanout [2, [3, 1]]      Pairwise (detached) as tsa
ahbf     4 leaves, leaf m gets a*m blocks     HierarchicalTA      T=3, ramp over whole run
dml      "<input>": 2 whole networks          Pairwise (detached) T=1, no ramp
======== ==================================== =================== ==========================

Default split points are known for ResNet-style models: torchvision-style (has ``layer4``):
last stage ``layer4``, TSA ``["layer3", "layer4"]``; CIFAR-style (``layer3``, no ``layer4``):
``layer3``, TSA ``["layer2", "layer3"]``. Any other model needs ``split=`` (the error lists
``branchify.split_points(model)``).

Choices that are this toolkit's (not fixed by the papers): TSA's ``a = 0.5, T = 3`` (no public
code exists); CL-ILR uses ONE's ramp and T; AHBF's default ``a`` is 2 for torchvision
(ImageNet-style) ResNets and 4 otherwise, following the paper's ImageNet / CIFAR settings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from torch import nn

from branchify.aggregators import Gate, HierarchicalTA, Mean, Pairwise, PeerAttention, PeerMean
from branchify.aggregators.base import Aggregator
from branchify.loss import OnlineKD
from branchify.spec import INPUT, Spec

if TYPE_CHECKING:  # the branched model class lives in the core; imported lazily at run time
    from branchify.model import BranchedModel

ONE_RAMP = 80 / 300
"""ONE's and OKDDip's ramp: 80 of 300 epochs, kept as a fraction so it scales with the run."""

COMMON = {
    "split": None, "target": 0, "init": "auto", "temperature": 3.0, "ramp": None, "ce_weight": 1.0,
    "kd_weight": 1.0, "detach": None, "teacher": None, "teacher_weight": 1.0, "teacher_temperature": None,
    "model_fn": None, "tracer": None, "feature_node": None,
}
"""Overrides every preset accepts (with their generic defaults; presets change some)."""

Builder = Callable[[nn.Module, dict], tuple[Spec, Aggregator, dict]]


class MethodError(ValueError):
    """Unknown method name, unknown override or a model whose split points cannot be guessed."""


@dataclass(frozen=True)
class Preset:
    """A named method: its defaults (every valid override) and how it builds spec + aggregator.

    ``build(model, options) -> (spec, aggregator, okd_kwargs)`` receives the merged options.
    """

    name: str
    summary: str
    defaults: dict[str, Any]
    build: Builder


_REGISTRY: dict[str, Preset] = {}


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def register_method(preset: Preset, *, overwrite: bool = False) -> Preset:
    """Add a preset to the registry (``method(preset.name, ...)`` then builds it).

    Example:
        >>> register_method(Preset("my_one", "ONE, 5 leaves", {**methods.get_preset("one").defaults,
        ...                        "branches": 5}, methods.get_preset("one").build))   # doctest: +SKIP
    """
    key = _key(preset.name)
    if key in _REGISTRY and not overwrite:
        raise MethodError(f"a method named {key!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[key] = preset
    return preset


def available_methods() -> list[str]:
    """Names of the registered presets.

    Example:
        >>> available_methods()
        ['ahbf', 'cl_ilr', 'dml', 'okddip', 'one', 'tsa', 'u_tsa']
    """
    return sorted(_REGISTRY)


def get_preset(name: str) -> Preset:
    """The preset registered under ``name`` (case-insensitive, ``-`` = ``_``)."""
    key = _key(name)
    if key not in _REGISTRY:
        raise MethodError(f"unknown method {name!r}; available methods: {available_methods()}")
    return _REGISTRY[key]


# ---------------------------------------------------------------------- split detection
def _split_candidates(model: nn.Module) -> list[str]:
    try:
        from branchify import split_points  # the core's listing (fx-traced execution order)
    except ImportError:
        return [name for name, _ in model.named_children()]
    try:
        return list(split_points(model))
    except Exception as exc:  # the listing is only advice in an error message; say why it is missing
        return [f"<split_points failed: {exc}>"]


def default_splits(model: nn.Module, levels: int) -> list[str]:
    """The last ``levels`` stages of a known ResNet-style family (1 or 2 levels).

    Example:
        >>> default_splits(torchvision.models.resnet18(), 2)    # doctest: +SKIP
        ['layer3', 'layer4']
    """
    has = {n: isinstance(getattr(model, n, None), nn.Module) for n in ("layer2", "layer3", "layer4")}
    if has["layer4"] and has["layer3"]:
        stages = ["layer3", "layer4"]
    elif has["layer3"] and has["layer2"]:
        stages = ["layer2", "layer3"]
    else:
        raise MethodError(
            f"cannot guess where to split a {type(model).__name__} (no ResNet-style layer3/layer4); pass "
            f"split=<module path> (a list of {levels} paths for tree methods). Candidates, from "
            f"branchify.split_points(model): {_split_candidates(model)}")
    return stages[-levels:]


def _as_splits(split: Any, levels: int | None, model: nn.Module) -> list[str]:
    """``split=`` as a list of paths; ``None`` -> the family default with ``levels`` levels."""
    if split is None:
        return default_splits(model, levels or 1)
    splits = [split] if isinstance(split, str) else list(split)
    if levels is not None and len(splits) != levels:
        raise MethodError(f"split={split!r} gives {len(splits)} split point(s) but this method needs "
                          f"{levels}")
    return splits


def _loss_kwargs(o: dict) -> dict:
    return {k: o[k] for k in ("temperature", "ramp", "ce_weight", "kd_weight", "detach", "teacher",
                              "teacher_weight", "teacher_temperature")}


def _branches(o: dict, minimum: int) -> int:
    k = o["branches"]
    if isinstance(k, bool) or not isinstance(k, int) or k < minimum:
        raise MethodError(f"branches={k!r} must be an int >= {minimum}")
    return k


# ---------------------------------------------------------------------- presets
def _build_one(model: nn.Module, o: dict) -> tuple[Spec, Aggregator, dict]:
    k = _branches(o, 1)
    spec = Spec(splits=_as_splits(o["split"], 1, model), fanout=[k], target=o["target"], init=o["init"])
    return spec, Gate(), _loss_kwargs(o)


def _mean_teacher(choice: str) -> Aggregator:
    """``"others"``: mean of the other peers, not detached (the authors' code); ``"all"``: all K, detached."""
    if choice == "others":
        return PeerMean()
    if choice == "all":
        return Mean()
    raise MethodError(f"mean={choice!r} is unknown; choose 'others' (mean of the other leaves, the authors' "
                      f"code) or 'all' (mean of all leaves, the student included)")


def _build_cl_ilr(model: nn.Module, o: dict) -> tuple[Spec, Aggregator, dict]:
    k = _branches(o, 2)
    splits = _as_splits(o["split"], 1, model)
    grad_scale = {splits[0]: 1.0 / k} if o["rescale"] and splits[0] != INPUT else {}
    spec = Spec(splits=splits, fanout=[k], target=o["target"], init=o["init"], grad_scale=grad_scale)
    return spec, _mean_teacher(o["mean"]), _loss_kwargs(o)


def _build_okddip(model: nn.Module, o: dict) -> tuple[Spec, Aggregator, dict]:
    k = _branches(o, 2)
    spec = Spec(splits=_as_splits(o["split"], 1, model), fanout=[k], target=o["target"], init=o["init"])
    if o["leader"] not in ("target", None):
        raise MethodError(f"leader={o['leader']!r}: pass 'target' (the deployed leaf leads, the paper's "
                          f"default) or None (no leader, every leaf is a peer: the authors' `en` mode)")
    # The leader is the deployed leaf, so it is spec.target ("target" resolves at bind).
    agg = PeerAttention(leader=o["leader"], proj_dim=o["proj_dim"], space=o["space"])
    return spec, agg, _loss_kwargs(o)


def _tsa_spec(model: nn.Module, o: dict, fanout: list | None) -> Spec:
    levels = len(fanout) if fanout is not None else (None if o["split"] is not None else 2)
    splits = _as_splits(o["split"], levels, model)
    if fanout is None:  # TSA-M-H: M children per node at every level
        fanout = [_branches(o, 1)] * len(splits)
    return Spec(splits=splits, fanout=fanout, target=o["target"], init=o["init"])


def _tsa_loss(o: dict) -> dict:
    a = float(o["alpha"])
    if not 0 <= a <= 1:
        raise MethodError(f"alpha={a} must be in [0, 1] (CE weight 1 - alpha, KD weight alpha)")
    kw = _loss_kwargs(o)
    # alpha sets the CE / KD balance unless the user gave the weights explicitly.
    kw["ce_weight"] = 1.0 - a if o["ce_weight"] is None else o["ce_weight"]
    kw["kd_weight"] = a if o["kd_weight"] is None else o["kd_weight"]
    return kw


def _build_tsa(model: nn.Module, o: dict) -> tuple[Spec, Aggregator, dict]:
    return _tsa_spec(model, o, o["fanout"]), Pairwise(), _tsa_loss(o)


def _build_u_tsa(model: nn.Module, o: dict) -> tuple[Spec, Aggregator, dict]:
    return _tsa_spec(model, o, o["fanout"]), Pairwise(), _tsa_loss(o)


def _build_ahbf(model: nn.Module, o: dict) -> tuple[Spec, Aggregator, dict]:
    k = _branches(o, 2)
    splits = _as_splits(o["split"], 1, model)
    deepen = o["deepen"]
    if deepen is None:
        a = o["aux"]
        if a == "auto":
            a = 2 if isinstance(getattr(model, "layer4", None), nn.Module) else 4
        if isinstance(a, bool) or not isinstance(a, int):
            raise MethodError(f"aux={a!r} must be an int (extra blocks per leaf step) or 'auto'")
        container = o["deepen_container"] or splits[-1]
        deepen = {container: [a * m for m in range(k)]} if a else {}
    spec = Spec(splits=splits, fanout=[k], target=o["target"], init=o["init"], deepen=deepen,
                deepen_init=o["deepen_init"])
    return spec, HierarchicalTA(lambdas=tuple(o["lambdas"]), own_ta=o["own_ta"]), _loss_kwargs(o)


def _build_dml(model: nn.Module, o: dict) -> tuple[Spec, Aggregator, dict]:
    k = _branches(o, 2)
    splits = [INPUT] if o["split"] is None else _as_splits(o["split"], 1, model)
    spec = Spec(splits=splits, fanout=[k], target=o["target"], init=o["init"])
    if o["kd"] == "pairwise":
        return spec, Pairwise(), _loss_kwargs(o)
    if o["kd"] == "peer_mean":
        return spec, PeerMean(), _loss_kwargs(o)
    raise MethodError(f"kd={o['kd']!r} is unknown; choose 'pairwise' (DML's paper: every peer teaches, "
                      f"detached) or 'peer_mean' (mean of the other peers, not detached: OKDDip's DML)")


for _preset in (
    Preset("one", "ONE: shared trunk, 3 leaves, gated teacher (detached), ramp 80/300",
           {**COMMON, "branches": 3, "ramp": ONE_RAMP}, _build_one),
    Preset("cl_ilr", "CL-ILR: ONE's tree, mean of the other leaves (not detached), trunk gradient x 1/K",
           {**COMMON, "branches": 3, "ramp": ONE_RAMP, "rescale": True, "mean": "others"}, _build_cl_ilr),
    Preset("okddip", "OKDDip: 3 peers + leader (target leaf), peer attention, not detached",
           {**COMMON, "branches": 4, "ramp": ONE_RAMP, "space": "logits", "proj_dim": None, "leader": "target"},
           _build_okddip),
    Preset("tsa", "TSA-2-3: splits at the last two stages, fanout [2, 2], pairwise KL",
           {**COMMON, "branches": 2, "fanout": None, "alpha": 0.5, "ce_weight": None, "kd_weight": None},
           _build_tsa),
    Preset("u_tsa", "U-TSA: unbalanced fanout [2, [3, 1]], pairwise KL",
           {**COMMON, "fanout": [2, [3, 1]], "alpha": 0.5, "ce_weight": None, "kd_weight": None}, _build_u_tsa),
    Preset("ahbf", "AHBF-OKD: 4 leaves deepened by 0, a, 2a, 3a blocks, hierarchical TAs",
           {**COMMON, "branches": 4, "ramp": 1.0, "aux": "auto", "deepen": None, "deepen_container": None,
            "lambdas": (4.0, 2.0), "own_ta": True, "deepen_init": "identity"}, _build_ahbf),
    Preset("dml", "DML: 2 whole networks (split '<input>'), pairwise KL, T = 1",
           {**COMMON, "branches": 2, "temperature": 1.0, "kd": "pairwise"}, _build_dml),
):
    register_method(_preset)


def method(name: str, model: nn.Module, *, batched: bool | str = "auto",
           **overrides: Any) -> tuple["BranchedModel", OnlineKD]:
    """Build a named method around ``model``: ``(branched model, loss)``.

    The aggregator is attached to the branched model (``model.aggregator``), so optimising
    ``model.parameters()`` trains it. Overrides change the preset's defaults; each preset's
    valid names are in ``get_preset(name).defaults``. ``model_fn``, ``tracer``,
    ``feature_node`` and ``batched`` (sibling replicas as one vmapped call) are passed to
    :func:`branchify.branchify`.

    Example:
        >>> bm, okd = method("okddip", cifar_resnet32(), branches=5, space="prob")   # doctest: +SKIP
        >>> loss = okd(bm(x), y); loss.total.backward()                              # doctest: +SKIP
    """
    preset = get_preset(name)
    unknown = sorted(set(overrides) - set(preset.defaults))
    if unknown:
        raise MethodError(f"method {preset.name!r} does not take {unknown}; valid overrides: "
                          f"{sorted(preset.defaults)}")
    options = {**preset.defaults, **overrides}
    spec, aggregator, loss_kwargs = preset.build(model, options)
    from branchify import branchify  # lazily: the core imports this module's package

    branched = branchify(model, spec, model_fn=options["model_fn"], tracer=options["tracer"],
                         feature_node=options["feature_node"], batched=batched)
    return branched, OnlineKD(branched, aggregator, **loss_kwargs)
