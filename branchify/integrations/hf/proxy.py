"""Proxies that know what HF forwards branch on, and how non-tensor objects are recognised.

Examples:
    >>> is_config(bert_classifier.config)                          # doctest: +SKIP
    True
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn


class InputProxy(fx.Proxy):
    """A proxy that knows the rank and dtype of model inputs and of parameters / buffers.

    HF forwards branch on them (``attention_mask.ndim < 4``, ``pixel_values.dtype !=
    weight.dtype``). For the model's inputs the answer is fixed before tracing and for
    parameters it is read from the tensor, so it is returned as a constant instead of failing
    as symbolic control flow (trace after choosing the model's dtype). Every other value keeps
    fx's symbolic behaviour.
    """

    def _known(self, key: str) -> Any:
        return self.node.meta.get(key)

    @property
    def ndim(self) -> Any:  # type: ignore[override]
        rank = self._known("branchify_rank")
        return rank if rank is not None else fx.proxy.Attribute(self, "ndim")

    @property
    def dtype(self) -> Any:  # type: ignore[override]
        dtype = self._known("branchify_dtype")
        return dtype if dtype is not None else fx.proxy.Attribute(self, "dtype")

    def dim(self) -> Any:
        rank = self._known("branchify_rank")
        return rank if rank is not None else self.tracer.create_proxy("call_method", "dim", (self,), {})

    def is_floating_point(self) -> Any:
        dtype = self._known("branchify_dtype")
        if dtype is not None:
            return dtype.is_floating_point
        return self.tracer.create_proxy("call_method", "is_floating_point", (self,), {})


def raw_tensor_attr(root: nn.Module, path: str) -> torch.Tensor | None:
    """The parameter / buffer at ``path``, read without ``nn.Module.__getattr__`` (patched by fx).

    Examples:
        >>> raw_tensor_attr(nn.Sequential(nn.Linear(2, 3)), "0.weight").shape
        torch.Size([3, 2])
    """
    *owners, name = path.split(".")
    m = root
    for part in owners:
        m = vars(m).get("_modules", {}).get(part)
        if m is None:
            return None
    d = vars(m)
    value = d.get("_parameters", {}).get(name)
    if value is None:
        value = d.get("_buffers", {}).get(name)
    return value if isinstance(value, torch.Tensor) else None


def is_config(obj: Any) -> bool:
    """Whether ``obj`` is a transformers config (checked by class names: nothing is imported).

    Examples:
        >>> is_config(object())
        False
    """
    return any(c.__name__ in ("PreTrainedConfig", "PretrainedConfig") for c in type(obj).__mro__)


def is_cache(obj: Any) -> bool:
    """Whether ``obj`` is a transformers key/value ``Cache``.

    Examples:
        >>> is_cache(None)
        False
    """
    return any(c.__name__ == "Cache" and c.__module__.startswith("transformers.") for c in type(obj).__mro__)
