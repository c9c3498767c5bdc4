"""Choosing a tracer for Hugging Face models (the coarse HF tracer lives in plugins)."""
from __future__ import annotations

import torch.fx as fx
from torch import nn


def maybe_hf_tracer(model: nn.Module) -> fx.Tracer | None:
    """The coarse HF tracer for a transformers ``PreTrainedModel``, else ``None`` (plain fx).

    transformers is imported only when the model already comes from it, so ``import
    branchify`` never needs transformers.
    """
    if not type(model).__module__.startswith("transformers."):
        return None
    try:
        from ..integrations.hf_tracer import coarse_tracer_for
    except ImportError:
        return None
    return coarse_tracer_for(model)
