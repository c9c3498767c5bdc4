"""Giving replicas their own starting weights.

Identical copies of a branch receive identical gradients and stay identical forever, so
every replica except child 0 of each node is re-initialised. Child 0 keeps the original
weights, so the all-child-0 leaf starts as exactly the user's model.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

INIT_DESCRIPTIONS = {
    "donor": "donor: weights of a fresh model_fn() per replica (the architecture's own init)",
    "hf": "hf: the model's own _init_weights (Hugging Face)",
    "shuffle": ("shuffle: each parameter's elements randomly permuted (exactly the architecture's "
                "i.i.d. init distribution when the model is freshly built)"),
    "reset": "reset: every module's reset_parameters() (PyTorch defaults, not the architecture's)",
    "copy": "copy: identical copies (branches stay identical; for checks only)",
    "pretrained": ("pretrained: copies of the pretrained weights, the task head re-initialised in every leaf "
                   "but leaf 0 (branchify.surgery.pretrained)"),
}


def resolve_init(init: str, model: nn.Module, model_fn: Callable[[], nn.Module] | None,
                 preferred: str | None = None, pretrained: str | None = None) -> str:
    """Turn ``"auto"`` into the best concrete method; check that the method can run.

    ``"auto"``: ``"pretrained"`` when the model's plugin found pretrained weights (``pretrained``
    is its reason), else ``"donor"`` with a ``model_fn``, else the model's plugin's ``preferred``
    method (``"hf"`` for Hugging Face models), else ``"shuffle"``. An explicit ``init`` always wins.

    Examples:
        >>> resolve_init("auto", nn.Linear(2, 2), None, pretrained="loaded with from_pretrained")
        'pretrained'
        >>> resolve_init("shuffle", nn.Linear(2, 2), None, pretrained="loaded with from_pretrained")
        'shuffle'
    """
    if init == "auto":
        if pretrained:
            return "pretrained"
        if model_fn is not None:
            return "donor"
        return preferred or "shuffle"
    if init == "donor" and model_fn is None:
        raise ValueError("init='donor' needs model_fn=<a factory that builds a fresh model of the "
                         "same architecture>; pass model_fn or use init='auto'")
    if init == "hf" and not callable(getattr(model, "_init_weights", None)):
        raise ValueError(f"init='hf' needs a model with Hugging Face's _init_weights (a PreTrainedModel), got "
                         f"{type(model).__name__}; use init='auto'")
    return init


@torch.no_grad()
def reinitialise(module: nn.Module, how: str, *, original: nn.Module,
                 model_fn: Callable[[], nn.Module] | None = None,
                 prefix_map: Callable[[str], str] | None = None) -> None:
    """Re-initialise ``module`` in place.

    Args:
        module: a replica (its state_dict keys are original-model keys, possibly via ``prefix_map``).
        how: a concrete method from :data:`INIT_DESCRIPTIONS`.
        original: the original model (for HF ``_init_weights``).
        model_fn: donor factory for ``"donor"``.
        prefix_map: maps a replica key to the donor key (used for appended deepening blocks).
    """
    if how == "copy":
        return
    if how == "donor":
        donor_sd = model_fn().state_dict()
        own = module.state_dict()
        for k, v in own.items():
            dk = prefix_map(k) if prefix_map else k
            if dk in donor_sd:
                v.copy_(donor_sd[dk])
        return
    if how == "hf":
        module.apply(original._init_weights)
    elif how == "shuffle":
        for p in module.parameters():
            flat = p.detach().reshape(-1)
            p.copy_(flat[torch.randperm(flat.numel(), device=flat.device)].view_as(p))
    elif how == "reset":
        for m in module.modules():
            if hasattr(m, "reset_parameters") and m is not module:
                m.reset_parameters()
    else:
        raise ValueError(f"unknown init {how!r}; choose one of {list(INIT_DESCRIPTIONS)}")
    for m in module.modules():
        if isinstance(m, _BatchNorm) and m.track_running_stats:
            m.reset_running_stats()
