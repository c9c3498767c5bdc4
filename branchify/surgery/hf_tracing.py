"""Choosing a tracer for Hugging Face models (the coarse HF tracer lives in plugins)."""
from __future__ import annotations

import torch.fx as fx
from torch import nn


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (also custom / remote-code subclasses).

    Decided from the class hierarchy's names, so transformers is never imported here.
    """
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers")
               for c in type(model).__mro__)


def maybe_hf_tracer(model: nn.Module) -> fx.Tracer | None:
    """The coarse HF tracer for a transformers ``PreTrainedModel``, else ``None`` (plain fx).

    transformers is imported only when the model already comes from it, so ``import
    branchify`` never needs transformers.
    """
    if not is_hf_model(model):
        return None
    try:
        from ..integrations.hf_tracer import coarse_tracer_for
    except ImportError:
        return None
    return coarse_tracer_for(model)
