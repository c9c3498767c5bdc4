"""How the core recognises, traces and initialises Hugging Face models (registered as an entry point).

Importing this module imports nothing from transformers: a model is recognised by the names in
its class hierarchy, and the coarse tracer is imported only when such a model is traced.

Example:
    >>> from branchify.registry import plugin_for
    >>> plugin_for(bert_classifier).name                           # doctest: +SKIP
    'transformers'
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from branchify.registry import Plugin

if TYPE_CHECKING:
    from .tracer import HFTracer


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (also custom / remote-code subclasses).

    Example:
        >>> is_hf_model(nn.Linear(2, 2))
        False
    """
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers")
               for c in type(model).__mro__)


def _tracer(model: nn.Module) -> "HFTracer":
    from .tracer import coarse_tracer_for

    return coarse_tracer_for(model)


PLUGIN = Plugin("transformers", matches=is_hf_model, tracer=_tracer, init="hf")
"""The ``branchify.plugins`` entry point ``transformers`` (see ``pyproject.toml``)."""
