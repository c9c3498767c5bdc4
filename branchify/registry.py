"""Plugins: how framework integrations tell the core how to trace and initialise their models.

(The table of named methods is another thing: :mod:`branchify.methods.presets`.)

The core never imports an integration (``import branchify`` needs neither transformers, timm nor
lightning). An integration describes itself with a :class:`Plugin` - a cheap test that a model is
one of its models, and hooks the core calls for such a model - and makes it known either by
calling :func:`register_plugin` or through the ``branchify.plugins`` entry point group (how the
integrations shipped in ``branchify.integrations`` are found). The entry points are read the
first time a model is looked up; loading one must not import its framework.

Examples:
    >>> from branchify.registry import Plugin, register_plugin
    >>> register_plugin(Plugin("mine", matches=lambda m: type(m).__name__ == "MyNet",
    ...                        tracer=lambda m: branchify.Tracer(leaf_modules=[MyAttention])))  # doctest: +SKIP
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Callable

import torch.fx as fx
from torch import nn

ENTRY_POINT_GROUP = "branchify.plugins"


@dataclass(frozen=True)
class Plugin:
    """What an integration provides for its models (every hook is optional).

    Attributes:
        name: shown in messages and :func:`plugin_for`'s result.
        matches: ``model -> bool``; must be cheap and must not import the framework (check the
            class hierarchy's module names instead).
        tracer: ``model -> fx.Tracer`` used when ``branchify()`` gets no ``tracer=``.
        model_fn: ``model -> (() -> fresh model) or None``: a factory of freshly initialised
            models of the same architecture, used for replica init when ``model_fn=`` is not given.
        init: a concrete replica-init method (``"hf"``) chosen by ``init="auto"`` when no factory
            is available.
        pretrained: ``model -> str or None``: why the model holds pretrained weights (e.g. "loaded
            with from_pretrained from 'bert-base-uncased'"), or ``None``; a reason makes
            ``init="auto"`` choose ``"pretrained"`` (:mod:`branchify.surgery.pretrained`).
        head: ``model -> list of module paths or None``: the task head ``init="pretrained"``
            re-initialises per replica (default: the final Linear producing the logits).
    """

    name: str
    matches: Callable[[nn.Module], bool]
    tracer: Callable[[nn.Module], fx.Tracer | None] | None = None
    model_fn: Callable[[nn.Module], Callable[[], nn.Module] | None] | None = None
    init: str | None = None
    pretrained: Callable[[nn.Module], str | None] | None = None
    head: Callable[[nn.Module], list[str] | None] | None = None


_PLUGINS: list[Plugin] = []
_ENTRY_POINTS_LOADED = False


def register_plugin(plugin: Plugin) -> Plugin:
    """Make ``plugin`` known (a plugin of the same name is replaced)."""
    if not isinstance(plugin, Plugin):
        raise TypeError(f"register_plugin takes a branchify.registry.Plugin, got {type(plugin).__name__}")
    _PLUGINS[:] = [p for p in _PLUGINS if p.name != plugin.name]
    _PLUGINS.append(plugin)
    return plugin


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin must not break models it would not even match
            warnings.warn(f"branchify plugin {ep.name!r} ({ep.value}) could not be loaded and is skipped: "
                          f"{type(exc).__name__}: {exc}", stacklevel=3)
            continue
        if not isinstance(plugin, Plugin):
            warnings.warn(f"branchify plugin entry point {ep.name!r} ({ep.value}) is a {type(plugin).__name__}, "
                          f"not a branchify.registry.Plugin; skipped", stacklevel=3)
        elif all(p.name != plugin.name for p in _PLUGINS):
            _PLUGINS.append(plugin)


def plugins() -> list[Plugin]:
    """Every known plugin (entry points included)."""
    _load_entry_points()
    return list(_PLUGINS)


def plugin_for(model: nn.Module) -> Plugin | None:
    """The plugin whose ``matches`` accepts ``model`` (the last registered wins), else ``None``."""
    for plugin in reversed(plugins()):
        if plugin.matches(model):
            return plugin
    return None


def plugin_tracer(model: nn.Module) -> fx.Tracer | None:
    """The tracer ``model``'s plugin gives it, or ``None`` (plain torch.fx)."""
    plugin = plugin_for(model)
    return plugin.tracer(model) if plugin is not None and plugin.tracer is not None else None
