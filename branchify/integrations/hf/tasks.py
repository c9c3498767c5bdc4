"""How a transformers model's logits are scored, and the tensor helpers the wrapper needs.

Token-level outputs (causal LM, seq2seq, token classification) use per-token CE and KL,
masked where the label is ``-100``; for a causal LM the logits at position ``i`` are scored
against label ``i + 1`` (the usual shift), and a seq2seq model without ``decoder_input_ids``
gets them from the labels shifted right.

Examples:
    >>> infer_task(GPT2LMHeadModel(GPT2Config()))                  # doctest: +SKIP
    'causal'
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import torch
from torch import nn

from ...outputs import BranchedOutput

TASKS = ("classification", "token", "causal", "seq2seq")


def infer_task(model: nn.Module) -> str:
    """How a transformers model's logits are scored: one of :data:`TASKS`.

    ``"seq2seq"`` (encoder-decoder), ``"causal"`` (a causal LM: labels shifted by one),
    ``"token"`` (token classification) or ``"classification"`` (one label per example).

    Examples:
        >>> infer_task(GPT2LMHeadModel(GPT2Config()))                      # doctest: +SKIP
        'causal'
    """
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    name = type(model).__name__
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        causal.update(value if isinstance(value, (tuple, list)) else [value])
    if name in causal or name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal"
    if name.endswith("ForTokenClassification"):
        return "token"
    return "classification"


def tie_groups(model: nn.Module) -> list[list[str]]:
    """Names of parameters that are one tensor in ``model`` (tied embeddings, shared heads).

    Examples:
        >>> tie_groups(gpt2_lm)                                    # doctest: +SKIP
        [['transformer.wte.weight', 'lm_head.weight']]
    """
    by_id: dict[int, list[str]] = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id[id(p)].append(name)
    return [names for names in by_id.values() if len(names) > 1]


def shift_right(labels: torch.Tensor, pad_token_id: int | None, start_token_id: int | None) -> torch.Tensor:
    """``decoder_input_ids`` from seq2seq labels: start token, then labels[:-1] (-100 -> pad).

    Examples:
        >>> shift_right(torch.tensor([[5, 6, -100]]), 0, 1)
        tensor([[1, 5, 6]])
    """
    if start_token_id is None:
        raise ValueError("the config has no decoder_start_token_id; pass decoder_input_ids explicitly")
    shifted = labels.new_zeros(labels.shape)
    shifted[:, 1:] = labels[:, :-1].clone()
    shifted[:, 0] = start_token_id
    return shifted.masked_fill(shifted == -100, pad_token_id if pad_token_id is not None else 0)


def shift_output(out: BranchedOutput) -> BranchedOutput:
    """Drop the last position of token-level logits / features (causal LM: predict the next token).

    Examples:
        >>> shift_output(out).logits[0].shape      # [B, L, V] -> [B, L - 1, V]   # doctest: +SKIP
    """
    def cut(t: torch.Tensor | None) -> torch.Tensor | None:
        return t[:, :-1] if t is not None and t.dim() >= 3 else t

    return replace(out, logits=[z[:, :-1] for z in out.logits], features=[cut(f) for f in out.features])


def unalias_state_dict(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> dict:
    """State-dict hook: clone tensors that share storage with an earlier entry.

    Tied parameters inside one segment (e.g. T5's encoder and decoder token embeddings) would
    otherwise make ``safetensors`` (used by the Trainer's checkpoints) refuse the state dict.
    Loading writes the same values into both names, so nothing changes on reload.

    Examples:
        >>> wrapper._register_state_dict_hook(unalias_state_dict)          # doctest: +SKIP
    """
    seen: set[tuple[int, int]] = set()
    for key in list(state_dict):
        value = state_dict[key]
        if not key.startswith(prefix) or not isinstance(value, torch.Tensor) or value.device.type == "meta":
            continue
        ptr = (value.untyped_storage().data_ptr(), value.device.index or 0)
        if ptr in seen:
            state_dict[key] = value.clone()
        else:
            seen.add(ptr)
    return state_dict
