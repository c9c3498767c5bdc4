"""The preset table - every named method, by name - and :func:`method`, the one call that builds any of them.

Not to be confused with :mod:`branchify.registry`, the plugins for other model zoos (matchers,
tracers, replica hooks). This module was ``branchify.methods.registry`` before; that import path
still gives this module.
"""
from __future__ import annotations

import difflib
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from torch import nn

from ..aggregators.base import Aggregator
from ..build import branchify
from ..errors import BranchifyError
from ..online_kd import OnlineKD
from ..spec import Spec
from ..views import check_views
from .options import Built, Renamed, option_defaults, options_class

if TYPE_CHECKING:
    from ..model import BranchedModel

Builder = Callable[[nn.Module, Any, Any], Built]
"""``build(model, options, tracer) -> Built``: the preset's tree, aggregator and loss options around
``model``, read from its options object (never written to); ``tracer`` is the one ``branchify()``
gets, for a builder that traces the model to choose a split."""

BRANCHIFY_OPTIONS = ("model_fn", "tracer", "feature_node", "batched", "init_noise")
"""Options every preset passes to :func:`branchify.branchify` instead of its builder."""

MODEL_OPTIONS = ("views",)
"""Options every preset sets on the built model: ``views`` -> ``model.set_views`` (:mod:`branchify.views`)."""


class MethodError(BranchifyError, ValueError):
    """Unknown method name, unknown or invalid override, or a model the method cannot be built on."""


@dataclass(frozen=True)
class Preset:
    """A named method: its options class (every valid option, with its default) and its builder.

    ``options_type`` is a frozen dataclass (the shipped presets derive theirs from
    :class:`~branchify.methods.options.CommonOptions`); a dict of defaults is accepted instead and
    turned into one. ``build(model, options, tracer) -> Built`` (:data:`Builder`). ``renamed``
    maps former option names to their new ones (accepted with a ``DeprecationWarning``).
    """

    name: str
    summary: str
    options_type: type
    build: Builder
    renamed: Mapping[str, Renamed] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.options_type, Mapping):
            object.__setattr__(self, "options_type", options_class(self.name, self.options_type))
        elif not (isinstance(self.options_type, type) and is_dataclass(self.options_type)):
            raise MethodError(f"preset {self.name!r}: options_type must be a dataclass (or a dict of defaults), "
                              f"got {self.options_type!r}")

    @property
    def defaults(self) -> dict[str, Any]:
        """Every option and its default, as a dict (the fields of :attr:`options_type`)."""
        return option_defaults(self.options_type)


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
    """Add a preset to the preset table (``method(preset.name, ...)`` then builds it).

    Examples:
        >>> from dataclasses import dataclass
        >>> from branchify.methods.one import ONEOptions
        >>> @dataclass(frozen=True, kw_only=True)
        ... class FiveOptions(ONEOptions):
        ...     branches: int = 5
        >>> five = Preset("one5", "ONE, 5 leaves", FiveOptions, get_preset("one").build)
        >>> register_method(five)                                                   # doctest: +SKIP
        >>> Preset("one5", "ONE, 5 leaves", {**get_preset("one").defaults, "branches": 5},
        ...        get_preset("one").build).defaults["branches"]                  # a dict of defaults also works
        5
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
    preset's ``setup`` steps (:attr:`Built.setup <branchify.methods.options.Built.setup>`, e.g. PCL
    attaching its temporal-mean copy)."""
    if options.get("views") is not None:
        branched.set_views(options["views"])
    for step in options.get("setup", ()):
        step(branched)


_PACKAGE = str(Path(__file__).resolve().parents[1])


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside this package (where the user's call is)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level


def _renamed(preset: Preset, overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` with the preset's former option names (:attr:`Preset.renamed`) replaced, each with
    a ``DeprecationWarning`` naming the new option."""
    for old, to in preset.renamed.items():
        if old not in overrides:
            continue
        if to.new in overrides:
            raise MethodError(f"method {preset.name!r}: give {to.new}= ({old}= is its former name), not both")
        value = overrides[old]
        new_value = to.values.get(value, value) if isinstance(value, str) else value
        warnings.warn(f"method {preset.name!r}: the option {old}= is now {to.new}=; pass {to.new}={new_value!r} "
                      f"instead of {old}={value!r}", DeprecationWarning, stacklevel=_caller_stacklevel())
        overrides = {**{k: v for k, v in overrides.items() if k != old}, to.new: new_value}
    return overrides


def _options(preset: Preset, overrides: dict[str, Any], passed_on: tuple[str, ...]) -> Any:
    """The preset's options object from ``overrides`` (the names in ``passed_on`` are accepted and
    left out); an unknown name raises :class:`MethodError` listing every valid one."""
    if "splits" in overrides:  # bf.Spec's spelling, accepted here too
        if "split" in overrides:
            raise MethodError("give split= or splits= (the same option), not both")
        overrides = {**{k: v for k, v in overrides.items() if k != "splits"}, "split": overrides["splits"]}
    overrides = _renamed(preset, overrides)
    names = [f.name for f in fields(preset.options_type)]
    valid = sorted({*names, *passed_on})
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        hints = "".join(nearest(u, valid) for u in unknown)
        raise MethodError(f"method {preset.name!r} does not take {unknown}{hints}\n"
                          f"valid options: {', '.join(valid)}")
    return preset.options_type(**{k: v for k, v in overrides.items() if k not in passed_on})


def method_options(name: str, **overrides: Any) -> Any:
    """The options a preset builds with: its options dataclass at its defaults, with ``overrides``
    checked and applied (the object ``bf.method(name, model, **overrides)`` hands its builder).

    Every field is documented in the preset's module (``type(method_options(name))``, also
    ``get_preset(name).options_type``); a wrong name lists every valid one.

    Examples:
        >>> method_options("dml")
        DMLOptions(split=None, target=0, init='auto', temperature=1.0, ramp=None, ce_weight=1.0, kd_weight=1.0, \
detach=None, teacher=None, teacher_weight=1.0, teacher_temperature=None, branches=2, ensemble='pairwise')
        >>> method_options("tsa", alpha=0.3).alpha
        0.3
    """
    return _options(get_preset(name), overrides, ())


def resolve(name: str, model: nn.Module, overrides: dict[str, Any]) -> Resolved:
    """Validate ``overrides`` and build the method's spec, aggregator and options.

    Every option is checked before anything is built; :func:`method` and the Hugging Face
    integration (:func:`branchify.integrations.hf.branchify_hf`) both go through here.
    """
    preset = get_preset(name)
    options = _options(preset, overrides, (*BRANCHIFY_OPTIONS, *MODEL_OPTIONS))
    model_options = {k: overrides[k] for k in MODEL_OPTIONS if k in overrides}
    check_views(model_options.get("views"))
    built = preset.build(model, options, overrides.get("tracer"))  # it traces with it to choose a split
    branchify_kwargs = {k: overrides[k] for k in BRANCHIFY_OPTIONS if k in overrides}
    traced = built.traced_copy()
    if traced is not None:  # the copy the builder traced: no second trace
        branchify_kwargs["traced"] = traced
    model_options["setup"] = list(built.setup)
    reason = built.default_split.reason if built.default_split is not None else None
    return Resolved(built.spec, built.aggregator, built.loss_kwargs, branchify_kwargs, reason, model_options)


def method(name: str, model: nn.Module, **overrides: Any) -> tuple["BranchedModel", OnlineKD]:
    """Build a named method around ``model``: ``(branched model, loss)``.

    The aggregator is attached to the branched model (``model.aggregator``), so optimising
    ``model.parameters()`` trains it. Overrides change the preset's defaults (each preset's
    options: :func:`method_options`, a documented dataclass); ``model_fn``, ``tracer``,
    ``feature_node``, ``batched`` and ``init_noise`` go to :func:`branchify.branchify`; ``views`` gives
    every leaf its own view of the batch (:mod:`branchify.views`). A wrong name lists every valid option.

    Examples:
        >>> bm, okd = method("okddip", cifar_resnet32(), branches=5, space="prob")   # doctest: +SKIP
        >>> loss = okd(bm(x), y); loss.total.backward()                              # doctest: +SKIP
    """
    r = resolve(name, model, overrides)
    branched = branchify(model, r.spec, **r.branchify_kwargs)
    branched.split_reason = r.split_reason
    apply_model_options(branched, r.model_options)
    return branched, OnlineKD(branched, r.aggregator, **r.loss_kwargs)
