"""The inputs of a traced Hugging Face model: which ones, in what order, and the tracing wrapper.

transformers 5.x root forwards take ``**kwargs``, which fx cannot re-create, so the root is traced
through a generated wrapper whose ``forward`` takes the chosen inputs by name and calls the model
by keyword with ``return_dict=False`` (and ``use_cache=False``), returning the logits.

Examples:
    >>> default_input_names(bert_classifier)                       # doctest: +SKIP
    ['input_ids', 'attention_mask', 'token_type_ids']
"""
from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import nn

from ...surgery.tracing import TraceError

WRAPPER_ATTR = "hf_model"
"""Name of the traced HF model inside the tracing wrapper (stripped from the final graph)."""

INPUT_RANKS = {"input_ids": 2, "attention_mask": 2, "token_type_ids": 2, "position_ids": 2,
               "decoder_input_ids": 2, "decoder_attention_mask": 2, "pixel_values": 4,
               "input_features": 3, "input_values": 2, "inputs_embeds": 3}
"""The rank every known input has (HF forwards branch on ``x.ndim``)."""

_REQUIRED_SECOND = ("decoder_input_ids",)


class HFTracerError(TraceError):
    """The coarse HF tracer could not trace a model; the message names the module and the fix."""


def _mask_default(mask: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    """``mask`` or, when it was left out, an all-ones mask shaped like ``like`` (no padding)."""
    if mask is None and like is not None:
        return torch.ones(like.shape[:2], dtype=torch.long, device=like.device)
    return mask


fx.wrap("_mask_default")  # the generated wrapper (exec'd with this module's globals) calls it
MASK_DEFAULT = _mask_default
"""The function itself (the global name is patched while tracing)."""


def forward_parameters(model: nn.Module) -> dict[str, inspect.Parameter]:
    """Named parameters of ``model.forward`` (``**kwargs`` / ``*args`` left out).

    Examples:
        >>> list(forward_parameters(bert_classifier))[:2]           # doctest: +SKIP
        ['input_ids', 'attention_mask']
    """
    sig = inspect.signature(type(model).forward)
    return {n: p for n, p in sig.parameters.items()
            if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def default_input_names(model: nn.Module) -> list[str]:
    """The inputs a branched HF model takes by default, in this order.

    ``model.main_input_name`` (``input_ids``, ``pixel_values``...), then for token inputs
    ``attention_mask``, ``token_type_ids`` (only when the config has ``type_vocab_size > 1``,
    as BERT does), and for encoder-decoder models ``decoder_input_ids`` and
    ``decoder_attention_mask``. Pass ``HFTracer(input_names=[...])`` for another set. Required
    inputs (the main one and ``decoder_input_ids``) come first.

    Examples:
        >>> default_input_names(bert_classifier)                   # doctest: +SKIP
        ['input_ids', 'attention_mask', 'token_type_ids']
    """
    params = forward_parameters(model)
    config = getattr(model, "config", None)
    main = getattr(model, "main_input_name", "input_ids")
    names = [main]
    if main == "input_ids":
        if "attention_mask" in params:
            names.append("attention_mask")
        if "token_type_ids" in params and (getattr(config, "type_vocab_size", 0) or 0) > 1:
            names.append("token_type_ids")
    if getattr(config, "is_encoder_decoder", False):
        names += [n for n in ("decoder_input_ids", "decoder_attention_mask") if n in params]
    return required_first(names)


def required_first(names: Sequence[str]) -> list[str]:
    """The main input, then ``decoder_input_ids`` (both required), then the optional inputs.

    Examples:
        >>> required_first(["input_ids", "attention_mask", "decoder_input_ids"])
        ['input_ids', 'decoder_input_ids', 'attention_mask']
    """
    names = list(names)
    required = [names[0]] + [n for n in names[1:] if n in _REQUIRED_SECOND]
    return required + [n for n in names if n not in required]


def _check_names(model: nn.Module, input_names: Sequence[str]) -> None:
    params = forward_parameters(model)
    accepts_kwargs = any(p.kind == p.VAR_KEYWORD for p in inspect.signature(type(model).forward).parameters.values())
    unknown = [n for n in input_names if n not in params and not accepts_kwargs]
    if unknown:
        raise HFTracerError(f"{type(model).__name__}.forward takes no input(s) {unknown}; its inputs are "
                            f"{list(params)}")
    for n in input_names:
        if not n.isidentifier():
            raise HFTracerError(f"input name {n!r} is not a Python identifier")


def make_wrapper(model: nn.Module, input_names: Sequence[str]) -> nn.Module:
    """A module whose ``forward(<input_names>)`` calls ``model`` by keyword and returns the logits.

    Examples:
        >>> make_wrapper(bert_classifier, ["input_ids"])(ids).shape   # doctest: +SKIP
        torch.Size([4, 3])
    """
    _check_names(model, input_names)
    input_names = required_first(input_names)
    main = input_names[0]
    sig_parts, body = [], []
    for n in input_names:
        sig_parts.append(n if n == main or n in _REQUIRED_SECOND else f"{n}=None")
        if n.endswith("attention_mask"):
            ref = "decoder_input_ids" if n.startswith("decoder_") and "decoder_input_ids" in input_names else main
            if INPUT_RANKS.get(ref) == 2:
                body.append(f"    {n} = _mask_default({n}, {ref})")
    call = ", ".join(f"{n}={n}" for n in input_names)
    extra = ["return_dict=False"]
    if "use_cache" in forward_parameters(model):
        extra.append("use_cache=False")
    src = (f"def forward(self, {', '.join(sig_parts)}):\n" + "\n".join(body) + ("\n" if body else "")
           + f"    out = self.{WRAPPER_ATTR}({call}, {', '.join(extra)})\n"
           + "    return out[0] if isinstance(out, (tuple, list)) else out\n")
    namespace: dict[str, Any] = {}
    exec(compile(src, f"<branchify HF wrapper of {type(model).__name__}>", "exec"), globals(), namespace)
    cls = type(f"{type(model).__name__}Inputs", (nn.Module,), {"forward": namespace["forward"]})
    wrapper = cls()
    setattr(wrapper, WRAPPER_ATTR, model)
    return wrapper


def input_meta(model: nn.Module, names: Sequence[str]) -> dict[str, tuple[int | None, torch.dtype | None]]:
    """Rank and dtype the traced code may assume for each input (ids/masks: long, else floats).

    Examples:
        >>> input_meta(bert_classifier, ["input_ids"])              # doctest: +SKIP
        {'input_ids': (2, torch.int64)}
    """
    float_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    meta = {}
    for n in names:
        integer = n.endswith(("input_ids", "attention_mask", "token_type_ids", "position_ids"))
        meta[n] = (INPUT_RANKS.get(n), torch.long if integer else float_dtype)
    return meta
