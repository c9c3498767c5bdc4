"""How the core recognises, traces and initialises Hugging Face models (registered as an entry point).

Importing this module imports nothing from transformers: a model is recognised by the names in
its class hierarchy, and the coarse tracer is imported only when such a model is traced.
"""
from __future__ import annotations

from torch import nn

from branchify.registry import Plugin


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (also custom / remote-code subclasses).

    Example:
        >>> is_hf_model(nn.Linear(2, 2))
        False
    """
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers")
               for c in type(model).__mro__)


def _tracer(model: nn.Module):
    from .hf_tracer import coarse_tracer_for

    return coarse_tracer_for(model)


PLUGIN = Plugin("transformers", matches=is_hf_model, tracer=_tracer, init="hf")
