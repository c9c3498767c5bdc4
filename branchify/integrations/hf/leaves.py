"""What the coarse tracer records as single calls: embeddings, layers and mask builders.

Examples:
    >>> coarse_leaf_paths(bert_classifier)[:3]                     # doctest: +SKIP
    ['bert.embeddings', 'bert.encoder.layer.0', 'bert.encoder.layer.1']
"""
from __future__ import annotations

import sys
import types
from typing import Any, Callable

import torch.fx as fx
from torch import nn

MASK_MODULES = ("transformers.masking_utils", "transformers.modeling_attn_mask_utils")
"""transformers modules whose functions are all mask builders."""


def _is_block_list(m: nn.Module) -> bool:
    kids = list(m.children())
    return (isinstance(m, nn.ModuleList) and len(kids) > 0 and len({type(k) for k in kids}) == 1
            and not type(kids[0]).__module__.startswith("torch.nn")
            and any(True for _ in kids[0].parameters()))


def coarse_leaf_paths(model: nn.Module) -> list[str]:
    """Module paths the coarse tracer records as single calls (embeddings and layers).

    A module is a leaf when its class is in ``model._no_split_modules`` (what transformers
    itself never splits across devices: the layers, sometimes the embeddings), when its class
    name contains ``Embedding`` (token / position / patch embeddings) or when it is one block
    of a ``ModuleList`` of identical blocks (the encoder / decoder layers). Leaves nested
    inside another leaf are not listed.

    Examples:
        >>> coarse_leaf_paths(bert_classifier)[:3]                 # doctest: +SKIP
        ['bert.embeddings', 'bert.encoder.layer.0', 'bert.encoder.layer.1']
    """
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    leaves: list[str] = []

    def walk(m: nn.Module, prefix: str, in_block_list: bool) -> None:
        for name, child in m.named_children():
            path = f"{prefix}{name}"
            cls = type(child)
            hf_class = cls.__module__.startswith("transformers.")
            if cls.__name__ in no_split or in_block_list or (hf_class and "Embedding" in cls.__name__):
                leaves.append(path)
                continue
            walk(child, path + ".", _is_block_list(child))

    walk(model, "", False)
    return leaves


def python_modules_of(model: nn.Module) -> list[types.ModuleType]:
    """The transformers Python modules that define the model's (sub)module classes.

    Examples:
        >>> [m.__name__ for m in python_modules_of(bert_classifier)][:1]   # doctest: +SKIP
        ['transformers.models.bert.modeling_bert']
    """
    seen: dict[str, types.ModuleType] = {}
    for m in model.modules():
        for cls in type(m).__mro__:
            mod = cls.__module__
            if mod.startswith("transformers.") and mod not in seen and mod in sys.modules:
                seen[mod] = sys.modules[mod]
    return list(seen.values())


def _is_mask_builder(name: str, fn: Any, module: types.ModuleType) -> bool:
    if not isinstance(fn, types.FunctionType):
        return False
    if fn.__module__ in MASK_MODULES:
        return True
    # Module-level mask builders of the model's own file (older models: _prepare_4d_*_mask...).
    return fn.__module__ == module.__name__ and "mask" in name.lower() and (
        name.lstrip("_").startswith(("create", "prepare", "make", "expand", "get", "update", "build")))


def mask_builders(model: nn.Module) -> list[tuple[dict, str, Callable]]:
    """``(globals, name, function)`` for every mask builder the model's modules can call.

    Examples:
        >>> sorted({name for _, name, _ in mask_builders(bert_classifier)})   # doctest: +SKIP
        ['create_bidirectional_mask', 'create_causal_mask']
    """
    found = []
    for module in python_modules_of(model):
        if module.__name__ in MASK_MODULES:
            continue
        for name, fn in list(vars(module).items()):
            if _is_mask_builder(name, fn, module):
                found.append((vars(module), name, fn))
    return found


def autowrapped(fn: Callable) -> Callable:
    """``fn`` recorded as one ``call_function`` node when called with proxies (like ``fx.wrap``).

    Examples:
        >>> wrapped = autowrapped(torch.add); wrapped(1, 2)      # doctest: +SKIP
        3
    """

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        proxy = None

        def find(a: Any) -> Any:
            nonlocal proxy
            if isinstance(a, fx.Proxy):
                proxy = a
            return a

        fx.node.map_aggregate(args, find)
        fx.node.map_aggregate(kwargs, find)
        if proxy is None:
            return fn(*args, **kwargs)
        return proxy.tracer.create_proxy("call_function", fn, args, kwargs)

    wrapper.__wrapped_by_branchify__ = fn  # type: ignore[attr-defined]
    return wrapper


class Patches:
    """Temporarily replaced globals, restored on exit.

    Examples:
        >>> with Patches() as p:                                    # doctest: +SKIP
        ...     p.set(vars(module), "make_mask", autowrapped(module.make_mask))
    """

    def __init__(self) -> None:
        self._saved: list[tuple[dict, str, Any]] = []

    def set(self, namespace: dict, name: str, value: Any) -> None:
        self._saved.append((namespace, name, namespace[name]))
        namespace[name] = value

    def __enter__(self) -> "Patches":
        return self

    def __exit__(self, *exc: Any) -> None:
        for namespace, name, value in reversed(self._saved):
            namespace[name] = value
        self._saved.clear()
