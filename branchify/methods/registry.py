"""The registry of named methods and :func:`method`, the one call that builds any of them."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from torch import nn

from ..aggregators.base import Aggregator
from ..build import branchify
from ..errors import BranchifyError
from ..online_kd import OnlineKD
from ..spec import Spec
from ..views import check_views

if TYPE_CHECKING:
    from ..model import BranchedModel

Builder = Callable[[nn.Module, dict], tuple[Spec, Aggregator, dict]]

BRANCHIFY_OPTIONS = ("model_fn", "tracer", "feature_node", "batched", "init_noise")
"""Options every preset passes to :func:`branchify.branchify` instead of its builder."""

MODEL_OPTIONS = ("views",)
"""Options every preset sets on the built model: ``views`` -> ``model.set_views`` (:mod:`branchify.views`)."""


class MethodError(BranchifyError, ValueError):
    """Unknown method name, unknown or invalid override, or a model the method cannot be built on."""


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


def nearest(word: str, choices: list[str], n: int = 3) -> str:
    """``"; did you mean 'x'?"`` for the closest choices, or ``""`` when none is close.

    Examples:
        >>> nearest("onee", ["one", "tsa", "dml"])
        "; did you mean 'one'?"
    """
    close = difflib.get_close_matches(word, choices, n=n, cutoff=0.6)
    if not close:
        return ""
    return "; did you mean " + " or ".join(repr(c) for c in close) + "?"


def register_method(preset: Preset, *, overwrite: bool = False) -> Preset:
    """Add a preset to the registry (``method(preset.name, ...)`` then builds it).

    Examples:
        >>> one = get_preset("one")
        >>> five = Preset("one5", "ONE, 5 leaves", {**one.defaults, "branches": 5}, one.build)  # doctest: +SKIP
        >>> register_method(five)                                                            # doctest: +SKIP
    """
    key = _key(preset.name)
    if key in _REGISTRY and not overwrite:
        raise MethodError(f"a method named {key!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[key] = preset
    return preset


def available_methods() -> list[str]:
    """Names of the registered presets.

    Examples:
        >>> available_methods()
        ['ahbf', 'cl_ilr', 'dml', 'kdcl', 'okddip', 'okdph', 'one', 'pcl', 'tsa', 'u_tsa']
    """
    return sorted(_REGISTRY)


def get_preset(name: str) -> Preset:
    """The preset registered under ``name`` (case-insensitive, ``-`` = ``_``)."""
    key = _key(name)
    if key not in _REGISTRY:
        raise MethodError(f"unknown method {name!r}{nearest(key, available_methods())}; available methods: "
                          f"{available_methods()}")
    return _REGISTRY[key]


@dataclass(frozen=True)
class Resolved:
    """A method built around one model, before the model is branchified.

    When the builder chose the default split, ``branchify_kwargs["traced"]`` is the traced copy of
    the model that choice was read from, so ``branchify(model, spec, **branchify_kwargs)`` cuts it
    instead of tracing the model a second time (branchify right away: it is the model as it was).
    """

    spec: Spec
    aggregator: Aggregator
    loss_kwargs: dict[str, Any]
    branchify_kwargs: dict[str, Any]
    split_reason: str | None  # how the default split was chosen (None when split= was given)
    model_options: dict[str, Any] = field(default_factory=dict)  # MODEL_OPTIONS given: apply_model_options


def apply_model_options(branched: Any, options: dict[str, Any]) -> None:
    """Set :data:`MODEL_OPTIONS` on a built model (``views`` -> ``branched.set_views``), then run the
    preset's ``setup`` steps (a builder puts ``o["_setup"] = [fn(branched), ...]``, e.g. PCL attaching
    its temporal-mean copy)."""
    if options.get("views") is not None:
        branched.set_views(options["views"])
    for step in options.get("setup", ()):
        step(branched)


def resolve(name: str, model: nn.Module, overrides: dict[str, Any]) -> Resolved:
    """Validate ``overrides`` and build the method's spec, aggregator and options.

    Every option is checked before anything is built; :func:`method` and the Hugging Face
    integration (:func:`branchify.integrations.hf.branchify_hf`) both go through here.
    """
    preset = get_preset(name)
    if "splits" in overrides:  # bf.Spec's spelling, accepted here too
        if "split" in overrides:
            raise MethodError("give split= or splits= (the same option), not both")
        overrides = {**{k: v for k, v in overrides.items() if k != "splits"}, "split": overrides["splits"]}
    valid = sorted({*preset.defaults, *BRANCHIFY_OPTIONS, *MODEL_OPTIONS})
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        hints = "".join(nearest(u, valid) for u in unknown)
        raise MethodError(f"method {preset.name!r} does not take {unknown}{hints}\n"
                          f"valid options: {', '.join(valid)}")
    passed_on = (*BRANCHIFY_OPTIONS, *MODEL_OPTIONS)
    options = {**preset.defaults, **{k: v for k, v in overrides.items() if k not in passed_on},
               "tracer": overrides.get("tracer")}  # builders trace with it when they choose a split
    spec, aggregator, loss_kwargs = preset.build(model, options)
    branchify_kwargs = {k: overrides[k] for k in BRANCHIFY_OPTIONS if k in overrides}
    chosen = options.get("_default_splits")
    if chosen is not None and chosen.traced is not None:  # the default split's traced copy: no second trace
        branchify_kwargs["traced"] = chosen.traced
    model_options = {k: overrides[k] for k in MODEL_OPTIONS if k in overrides}
    check_views(model_options.get("views"))
    model_options["setup"] = list(options.get("_setup", ()))
    return Resolved(spec, aggregator, loss_kwargs, branchify_kwargs, options.get("_split_reason"), model_options)


def method(name: str, model: nn.Module, **overrides: Any) -> tuple["BranchedModel", OnlineKD]:
    """Build a named method around ``model``: ``(branched model, loss)``.

    The aggregator is attached to the branched model (``model.aggregator``), so optimising
    ``model.parameters()`` trains it. Overrides change the preset's defaults (each preset's
    options: ``get_preset(name).defaults``); ``model_fn``, ``tracer``, ``feature_node`` and
    ``batched`` go to :func:`branchify.branchify`; ``views`` gives every leaf its own view of the batch
    (:mod:`branchify.views`). A wrong name lists every valid option.

    Examples:
        >>> bm, okd = method("okddip", cifar_resnet32(), branches=5, space="prob")   # doctest: +SKIP
        >>> loss = okd(bm(x), y); loss.total.backward()                              # doctest: +SKIP
    """
    r = resolve(name, model, overrides)
    branched = branchify(model, r.spec, **r.branchify_kwargs)
    branched.split_reason = r.split_reason
    apply_model_options(branched, r.model_options)
    return branched, OnlineKD(branched, r.aggregator, **r.loss_kwargs)
