"""Typed method options and what a preset's builder returns.

Every preset declares its options as one frozen dataclass deriving from :class:`CommonOptions`
(the field names are the keywords of ``bf.method(name, model, **options)``, the field defaults
the preset's defaults, each field documented where it is declared). ``bf.method`` checks the
keywords against those fields, builds the options object and hands it to the preset's builder,
which reads it and returns a :class:`Built`: the tree, the aggregator, the loss options and the
choices it made along the way (the default split and its traced copy, steps to run on the built
model). The options object is never written to.

Examples:
    >>> from branchify.methods import method_options
    >>> method_options("one").branches, method_options("one", branches=5).branches
    (3, 5)
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from ..aggregators.base import Aggregator
    from ..schedules import Schedule
    from ..spec import Spec
    from ..surgery.default_split import DefaultSplits
    from ..surgery.tracing import TracedCopy


@dataclass(frozen=True, kw_only=True)
class CommonOptions:
    """The options every preset accepts, at their generic defaults (a preset's class changes some).

    ``model_fn``, ``tracer``, ``feature_node``, ``batched`` and ``init_noise`` are accepted by every
    preset too; they are not method options and go to :func:`branchify.branchify` as given, and
    ``views`` goes to the built model (:mod:`branchify.views`).
    """

    split: str | Sequence[str] | None = None
    """Where to cut: a module path, or one per tree level (``"<input>"`` first: no shared trunk).
    ``None``: the default split rule (:mod:`branchify.surgery.default_split`); ``splits=`` is the
    same option."""
    target: int = 0
    """The leaf deployed by ``export()``."""
    init: str = "auto"
    """How the replicated branches start (:class:`~branchify.Spec`'s ``init``)."""
    temperature: float = 3.0
    """T of every KD term (multiplied in as ``T^2``)."""
    ramp: Schedule | int | float | None = None
    """Schedule of the KD weight: ``None`` (constant 1), epochs (int), a fraction of the run
    (float) or a :class:`~branchify.schedules.Schedule`."""
    ce_weight: float | None = 1.0
    """Weight of every cross-entropy (leaves and aggregator teachers)."""
    kd_weight: float | None = 1.0
    """Weight of the KD terms."""
    detach: bool | None = None
    """``None``: each aggregator's documented rule; ``True`` / ``False`` force every KD term's
    teacher to be (not) detached."""
    teacher: nn.Module | None = None
    """An optional frozen pre-trained model distilled into every leaf as well (e.g. OKDDip+KD)."""
    teacher_weight: float = 1.0
    """Weight of the pre-trained teacher's KD terms (not ramped)."""
    teacher_temperature: float | None = None
    """T of the pre-trained teacher's KD terms (``None``: ``temperature``)."""


@dataclass(frozen=True)
class Renamed:
    """An option's former name, still accepted with a :class:`DeprecationWarning` naming ``new``.

    ``values`` maps a former value to its new spelling (values not in it pass unchanged).
    """

    new: str
    values: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Built:
    """What a preset's builder returns: the method around one model, and the choices it made."""

    spec: Spec
    """The tree to cut."""
    aggregator: Aggregator
    """The aggregator attached to the branched model."""
    loss_kwargs: dict[str, Any]
    """Keyword arguments of :class:`~branchify.OnlineKD`."""
    default_split: DefaultSplits | None = None
    """The default split rule's choice when ``split`` was not given (its ``reason`` becomes
    ``model.split_reason``, its traced copy is cut by ``branchify()`` instead of a second trace)."""
    traced: TracedCopy | None = None
    """A traced copy the builder read the model from otherwise (``branchify()`` cuts it)."""
    setup: tuple[Callable[[Any], None], ...] = ()
    """Steps run on the built model after ``branchify()`` and ``views`` (PCL attaches its temporal
    mean, OKDPH its weight fusion)."""

    def traced_copy(self) -> TracedCopy | None:
        """The traced copy ``branchify()`` can cut (``None``: it traces the model itself).

        Examples:
            >>> from branchify.methods import get_preset, method_options
            >>> built = get_preset("one").build(net, method_options("one"), None)  # doctest: +SKIP
            >>> built.traced_copy() is built.default_split.traced                 # doctest: +SKIP
            True
        """
        if self.traced is not None:
            return self.traced
        return self.default_split.traced if self.default_split is not None else None


def option_defaults(options_type: type) -> dict[str, Any]:
    """Every option of a preset's options class and its default.

    Examples:
        >>> option_defaults(CommonOptions)["temperature"]
        3.0
    """
    out = {}
    for f in fields(options_type):
        out[f.name] = f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]
    return out


def options_class(name: str, defaults: Mapping[str, Any]) -> type:
    """A frozen options class with exactly ``defaults``' keys as fields (a preset registered with a
    dict of defaults gets one, so its builder reads attributes as the shipped presets' do).

    Examples:
        >>> FiveOptions = options_class("one5", {"branches": 5, "split": None})
        >>> FiveOptions(split="layer3")
        One5Options(branches=5, split='layer3')
    """
    specs = []
    for key, value in defaults.items():
        if type(value).__hash__ is None:  # a list or dict default: the same object, as the dict held it
            specs.append((key, Any, field(default_factory=lambda v=value: v)))
        else:
            specs.append((key, Any, field(default=value)))
    title = "".join(part.capitalize() for part in name.replace("-", "_").split("_"))
    return make_dataclass(f"{title}Options", specs, frozen=True, kw_only=True)
