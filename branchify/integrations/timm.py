"""How the core recognises, traces and initialises timm models (registered as an entry point).

A timm model is recognised by the module names of its class hierarchy (``timm.models...``), so
importing this module imports nothing from timm; timm is imported inside the hooks, when such a
model - and therefore timm - already exists.

* **Tracing**: timm keeps registries of the modules and free functions its own fx feature
  extraction must not trace through (``timm.layers.register_notrace_module`` /
  ``register_notrace_function``: ``BatchNormAct2d``, ``NormFreeBlock``, ``MobileVitBlock``,
  swin's ``window_reverse``...). :func:`timm_tracer` hands both registries to a
  :class:`branchify.Tracer`, so such models trace without user hints. A module that cannot be
  traced and is not registered by timm still needs ``tracer=branchify.Tracer(leaf_modules=[...])``.
* **Replica init**: :func:`timm_model_fn` returns a factory calling
  ``timm.create_model(<architecture>, num_classes=..., in_chans=...[, img_size=...])`` with the
  architecture read from ``model.pretrained_cfg`` and the sizes read from the model, so every
  re-initialised replica starts from exactly timm's own init. Keyword arguments that change
  initial *values* but no shapes (``init_values``, ``weight_init``...) cannot be read back from a
  model: pass ``model_fn=lambda: timm.create_model(name, **the_same_kwargs)`` for those.
* **Export**: ``BranchedModel.export()`` returns the model's own timm class, whose state_dict
  loads strictly into ``timm.create_model`` with the kwargs the model was built with.

Examples:
    >>> import timm, branchify as bf
    >>> net = timm.create_model("resnet18", pretrained=False, num_classes=10)
    >>> bm, okd = bf.method("one", net)             # timm's tracer hints + timm's init, automatically
    >>> student = bm.export()                        # a timm ResNet again       # doctest: +SKIP
"""
from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable

from torch import nn

from ..registry import Plugin
from ..surgery.pretrained import looks_trained
from ..surgery.tracing import Tracer


def _is_timm_class(cls: type) -> bool:
    return cls.__module__ == "timm" or cls.__module__.startswith("timm.")


def is_timm_model(model: nn.Module) -> bool:
    """Whether ``model``'s class (or a base class, for user subclasses) comes from timm.

    Examples:
        >>> is_timm_model(nn.Linear(2, 2))
        False
    """
    return any(_is_timm_class(c) for c in type(model).__mro__)


EXTRA_LEAVES = ("StdConv2d", "ScaledStdConv2d", "DropPath")
"""``timm.layers`` classes made leaves on top of timm's registry: weight-standardised convolutions
normalise their weight with ``F.batch_norm(..., training=True)`` - batch statistics by design -
which a traced graph must not turn into running statistics in eval mode (their ``...Same``
variants are registered by timm already; NFNets and BiT ResNetV2s use them). ``DropPath``'s
``drop_path`` branches on ``if not training`` in Python, which tracing would resolve once for
good (stochastic depth gone from a model traced in eval mode); as a leaf it follows ``.train()``."""


class TimmTracer(Tracer):
    """:class:`branchify.Tracer` for timm models: timm's fx hints, and optional inputs traced at their defaults.

    A forward argument with a ``None`` or constant default (hiera's ``mask=None``, a ViT's
    ``attn_mask=None, is_causal=False``) would otherwise be traced as a tensor, recording the
    branch a real value takes (or failing on ``if is_causal:``); it is traced as its default
    instead (``concrete_args``), so the branched model takes the image alone. Pass
    ``concrete_args`` to :meth:`trace` to choose otherwise.

    Examples:
        >>> gm = torch.fx.GraphModule(model, TimmTracer(leaf_modules=[...]).trace(model))  # doctest: +SKIP
    """

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> Any:
        if concrete_args is None and isinstance(root, nn.Module):
            concrete_args = optional_inputs(root) or None
        return super().trace(root, concrete_args=concrete_args)


def optional_inputs(model: nn.Module) -> dict[str, Any]:
    """``model.forward``'s arguments after the first whose default is ``None`` or a constant, with it.

    Examples:
        >>> class Net(nn.Module):
        ...     def forward(self, x, mask=None, is_causal=False, scale=torch.ones(1)): return x
        >>> optional_inputs(Net())
        {'mask': None, 'is_causal': False}
    """
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    return {p.name: p.default for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and (p.default is None or isinstance(p.default, (bool, int, float, str)))}


def timm_tracer(model: nn.Module) -> TimmTracer:
    """A :class:`TimmTracer` with timm's registered leaf modules and autowrap functions.

    Examples:
        >>> tracer = timm_tracer(timm.create_model("swin_tiny_patch4_window7_224"))  # doctest: +SKIP
        >>> gm = branchify.trace(model, tracer)                                       # doctest: +SKIP
    """
    import timm.layers
    from timm.layers import get_notrace_functions, get_notrace_modules

    # timm also accepts names in register_notrace_function; fx autowraps callables only.
    functions = [f for f in get_notrace_functions() if callable(f)]
    modules = [m for m in get_notrace_modules() if isinstance(m, type)]
    modules += [getattr(timm.layers, n) for n in EXTRA_LEAVES if hasattr(timm.layers, n)]
    return TimmTracer(leaf_modules=modules, autowrap_functions=functions)


def architecture_name(model: nn.Module) -> str | None:
    """The timm architecture ``model`` was created as (``pretrained_cfg["architecture"]``), or ``None``.

    Examples:
        >>> architecture_name(timm.create_model("resnet18.a1_in1k"))   # doctest: +SKIP
        'resnet18'
    """
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and cfg.get("architecture"):
            return str(cfg["architecture"])
    return None


def _in_chans(model: nn.Module) -> int | None:
    """Input channels: the model's ``in_chans`` if it keeps one, else the first conv's (the stem)."""
    chans = getattr(model, "in_chans", None)
    if isinstance(chans, int):
        return chans
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return m.in_channels
    return None


def _img_size(model: nn.Module) -> Any:
    """The image size the model keeps (``img_size`` on it, its ``patch_embed`` or its ``stem``)."""
    for owner in (model, getattr(model, "patch_embed", None), getattr(model, "stem", None)):
        size = getattr(owner, "img_size", None)
        if isinstance(size, int):
            return size
        if isinstance(size, (tuple, list)) and size and all(isinstance(s, int) for s in size):
            return tuple(size)
    return None


def creation_kwargs(model: nn.Module) -> list[dict[str, Any]]:
    """Candidate ``timm.create_model`` kwargs read from ``model``, the plainest first.

    Examples:
        >>> creation_kwargs(timm.create_model("resnet18", num_classes=10))   # doctest: +SKIP
        [{'num_classes': 10, 'in_chans': 3}]
    """
    base: dict[str, Any] = {}
    if isinstance(getattr(model, "num_classes", None), int):
        base["num_classes"] = model.num_classes
    chans = _in_chans(model)
    if chans is not None:
        base["in_chans"] = chans
    size = _img_size(model)
    return [base] if size is None else [base, {**base, "img_size": size}]


def _mismatch(model: nn.Module, donor: nn.Module) -> str | None:
    """What differs between the two models' classes and state_dict shapes, or ``None``."""
    if type(donor) is not type(model):
        return f"it builds a {type(donor).__name__}, not a {type(model).__name__}"
    mine, theirs = model.state_dict(), donor.state_dict()
    if mine.keys() != theirs.keys():
        extra, missing = sorted(theirs.keys() - mine.keys()), sorted(mine.keys() - theirs.keys())
        parts = [f"{len(keys)} state_dict entries {what} ({', '.join(keys[:3])}, ...)"
                 for keys, what in ((extra, "the model lacks"), (missing, "of the model's are missing")) if keys]
        return "it builds a different architecture: " + "; ".join(parts)
    for k, v in mine.items():
        if v.shape != theirs[k].shape:
            return f"{k} has shape {tuple(theirs[k].shape)} instead of {tuple(v.shape)}"
    return None


def _build(name: str, kwargs: dict[str, Any], meta: bool) -> nn.Module:
    import timm
    import torch

    if not meta:
        return timm.create_model(name, pretrained=False, **kwargs)
    with torch.device("meta"):  # shapes only: no memory, no init work
        return timm.create_model(name, pretrained=False, **kwargs)


def _guessed_sizes(model: nn.Module, donor: nn.Module, limit: int = 6) -> list[int]:
    """Square image sizes that could explain the shape differences between ``model`` and a
    default-size build (a fixed-input-size model that does not keep its ``img_size``, e.g. LeViT).

    A size-dependent tensor (position embedding, attention bias per token) grows with the token
    count, i.e. the image area: the first differing tensor's element ratio scales the default
    size; the nearest multiples of the usual patch strides are returned, nearest first.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    default = (cfg.get("input_size") or (0, 0, 0))[-1]
    mine, theirs = model.state_dict(), donor.state_dict()
    if not cfg.get("fixed_input_size") or not default or mine.keys() != theirs.keys():
        return []
    ratios = [v.numel() / theirs[k].numel() for k, v in mine.items()
              if v.shape != theirs[k].shape and theirs[k].numel()]
    if not ratios:
        return []
    guess = default * ratios[0] ** 0.5
    sizes = {round(guess / step) * step + d * step for step in (16, 14, 32, 8) for d in (-1, 0, 1)}
    return sorted((s for s in sizes if s > 0), key=lambda s: (abs(s - guess), s))[:limit]


def _fitting_kwargs(model: nn.Module, name: str, tried: list[str]) -> dict[str, Any] | None:
    """The first kwargs whose (meta-device) build has ``model``'s class and shapes, else ``None``."""
    for kwargs in creation_kwargs(model):
        try:
            donor = _build(name, kwargs, meta=True)
        except Exception as exc:  # noqa: BLE001 - a candidate the architecture rejects
            tried.append(f"{_fmt(name, kwargs)} fails: {type(exc).__name__}: {exc}")
            continue
        why = _mismatch(model, donor)
        if why is None:
            return kwargs
        tried.append(f"{_fmt(name, kwargs)}: {why}")
        for size in _guessed_sizes(model, donor):
            sized = {**kwargs, "img_size": size}
            try:
                if _mismatch(model, _build(name, sized, meta=True)) is None:
                    return sized
            except Exception:  # noqa: BLE001,S112 - a size the architecture rejects
                continue
    return None


def _fmt(name: str, kwargs: dict[str, Any]) -> str:
    return f"timm.create_model({name!r}, " + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"


def timm_model_fn(model: nn.Module) -> Callable[[], nn.Module] | None:
    """A factory of freshly initialised copies of ``model``'s timm architecture, or ``None``.

    The architecture is ``model.pretrained_cfg["architecture"]``; ``num_classes``, ``in_chans``
    and (for fixed-size models) ``img_size`` are read from the model (:func:`creation_kwargs`,
    the image size guessed from the shapes when the model does not keep it). Candidates are
    checked on the meta device, then the fitting one is built for real and checked again; that
    build is handed out as the first replica, so checking costs one meta build. With no
    architecture name, or no candidate with ``model``'s class and state_dict shapes (e.g. a changed
    depth or width), a warning says so and ``None`` makes replicas fall back to ``init="shuffle"``.

    Examples:
        >>> make = timm_model_fn(timm.create_model("resnet18", num_classes=10))   # doctest: +SKIP
        >>> make().fc.out_features                                                # doctest: +SKIP
        10
    """
    if type(model).__module__.split(".")[0] != "timm":
        return None  # a user's subclass: timm.create_model would build the base class
    name = architecture_name(model)
    if name is None:
        warnings.warn(f"this timm {type(model).__name__} has no pretrained_cfg['architecture'], so "
                      f"branchify cannot rebuild it for replica init (falling back to init='shuffle'); "
                      f"pass model_fn=lambda: timm.create_model(<name>, **<its kwargs>)", stacklevel=3)
        return None
    tried: list[str] = []
    kwargs = _fitting_kwargs(model, name, tried)
    candidates = [kwargs] if kwargs is not None else creation_kwargs(model)  # the meta device can fail
    for kwargs in candidates:
        try:
            donor = _build(name, kwargs, meta=False)
        except Exception as exc:  # noqa: BLE001 - reported below
            tried.append(f"{_fmt(name, kwargs)} fails: {type(exc).__name__}: {exc}")
            continue
        why = _mismatch(model, donor)
        if why is None:
            return _factory(name, kwargs, donor)
        tried.append(f"{_fmt(name, kwargs)}: {why}")
    warnings.warn(f"branchify cannot rebuild this timm {type(model).__name__} for replica init "
                  f"(falling back to init='shuffle'): " + "; ".join(dict.fromkeys(tried)) +
                  f"; pass model_fn=lambda: timm.create_model({name!r}, **<the kwargs it was built with>)",
                  stacklevel=3)
    return None


def _factory(name: str, kwargs: dict[str, Any], first: nn.Module) -> Callable[[], nn.Module]:
    pending = [first]

    def make() -> nn.Module:
        """A fresh ``timm.create_model(name, **kwargs)`` (the checked first build, then new ones)."""
        return pending.pop() if pending else _build(name, kwargs, meta=False)

    make.__qualname__ = make.__name__ = f"timm_{name}"
    make.timm_name, make.timm_kwargs = name, dict(kwargs)  # type: ignore[attr-defined]
    return make


def timm_pretrained(model: nn.Module) -> str | None:
    """Why ``model`` holds pretrained weights, or ``None``. timm keeps no record of
    ``pretrained=True`` (``pretrained_cfg`` is set either way), so the weights decide: a model
    whose normalisation layers hold trained, non-constant values (:func:`looks_trained`) was
    loaded or trained; a freshly created one has them at their constant init.

    Examples:
        >>> timm_pretrained(timm.create_model("resnet18"))                                    # doctest: +SKIP
        >>> timm_pretrained(timm.create_model("resnet18", pretrained=True))                   # doctest: +SKIP
        'a timm model whose normalisation layers hold trained values (pretrained weights)'
    """
    if not looks_trained(model):
        return None
    return "a timm model whose normalisation layers hold trained values (pretrained weights)"


def timm_head(model: nn.Module) -> list[str] | None:
    """The classifier module(s) timm names in ``pretrained_cfg["classifier"]`` (``fc``, ``head.fc``...)."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if not names:
        return None
    return [names] if isinstance(names, str) else list(names)


PLUGIN = Plugin("timm", matches=is_timm_model, tracer=timm_tracer, model_fn=timm_model_fn,
                pretrained=timm_pretrained, head=timm_head)
