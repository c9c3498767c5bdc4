"""``branchify_hf``: a named method around a Hugging Face model, ready for the Trainer.

Built on :func:`branchify.methods.resolve`, like :func:`branchify.method`: the same presets,
option checks, defaults and error messages; aggregators are sized from the branched model (ONE's
gate from the width at the cut, ``BranchedModel.cut_channels``). The one HF-specific default is
where an encoder-decoder is cut (:func:`default_hf_splits`).

Examples:
    >>> model = branchify_hf("one", BertForSequenceClassification(cfg),
    ...                      split="bert.encoder.layer.2")                  # doctest: +SKIP
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from ...build import branchify
from ...methods import resolve
from ...methods.presets import apply_model_options
from ...online_kd import OnlineKD
from ...surgery.default_split import default_splits, pick_blocks
from .leaves import coarse_leaf_paths
from .tracer import HFTracer
from .wrapper import BranchedHFModel

__all__ = ["branchify_hf", "default_hf_splits"]


def decoder_blocks(model: nn.Module) -> list[str] | None:
    """The layer paths of an encoder-decoder's decoder stack (``None`` for other models).

    Examples:
        >>> decoder_blocks(t5_with_3_decoder_layers)                # doctest: +SKIP
        ['decoder.block.0', 'decoder.block.1', 'decoder.block.2']
    """
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    path = next((n for n, m in model.named_modules() if m is decoder), None) if decoder is not None else None
    if not path:
        return None
    stacks: dict[str, list[str]] = {}
    for leaf in coarse_leaf_paths(model):
        parent, _, idx = leaf.rpartition(".")
        if idx.isdigit() and (parent == path or parent.startswith(path + ".")):
            stacks.setdefault(parent, []).append(leaf)
    return max(stacks.values(), key=len) if stacks else None


def default_hf_splits(model: nn.Module, levels: int) -> list[str]:
    """Where an HF model is cut for a ``levels``-level tree when no split is given.

    The generic rule (:mod:`branchify.surgery.default_split`: block ``ceil(2n/3)`` for one level,
    ``ceil(n/3), ceil(2n/3)`` for two), except that an encoder-decoder's body is its decoder
    stack. Why: under the coarse tracer every layer counts as one traced operation, so the
    generic rule sees the encoder and decoder stacks as equal work and takes the encoder by
    execution order; a cut there puts the whole decoder into every branch, while the decoder -
    the stack that produces the logits - gives the intended shape (shared trunk, branched last
    layers + head).

    Examples:
        >>> default_hf_splits(bert_with_3_layers, 2)                 # doctest: +SKIP
        ['bert.encoder.layer.1', 'bert.encoder.layer.2']
        >>> default_hf_splits(marian_with_3_decoder_layers, 1)       # doctest: +SKIP
        ['model.decoder.layers.2']
    """
    blocks = decoder_blocks(model)
    if blocks is None:
        return default_splits(model, levels, HFTracer()).splits
    if len(blocks) < levels + 1:
        raise ValueError(f"cannot choose a default split for {type(model).__name__}: its decoder has "
                         f"{len(blocks)} layer(s) {blocks}, too few for a {levels}-level tree; pass split=[...]")
    return pick_blocks(blocks, levels)


def _decoder_default(model: nn.Module, chosen: list[str]) -> tuple[list[str], str] | None:
    """The decoder split replacing the generic rule's ``chosen`` one, and why (``None``: keep it)."""
    blocks = decoder_blocks(model)
    if blocks is None or all(s in blocks for s in chosen) or len(blocks) < len(chosen) + 1:
        return None
    splits = pick_blocks(blocks, len(chosen))
    return splits, (f"default split {splits}: the decoder stack of an encoder-decoder ({len(blocks)} layers, "
                    f"{blocks[0]} .. {blocks[-1]}) cut by the generic rule (instead of the encoder: {chosen})")


def _method_and_model(args: tuple[Any, ...], method: str | None, model: nn.Module | None) -> tuple[str, nn.Module]:
    """``(method name, model)`` from branchify_hf's positional arguments (either order: the
    ``nn.Module`` is the model, the string the method) and its ``method=`` / ``model=`` keywords."""
    if len(args) > 2:
        raise TypeError(f"branchify_hf takes a method name and a model, got {len(args)} positional arguments")
    for arg in args:
        if isinstance(arg, nn.Module) and model is None:
            model = arg
        elif isinstance(arg, str) and method is None:
            method = arg
        else:
            raise TypeError(f"branchify_hf(method, model): got {type(arg).__name__} {arg!r:.60} in addition to "
                            f"method={method!r} and a model={type(model).__name__}; pass one method name (a str, "
                            f"branchify.available_methods() lists them) and one nn.Module")
    if model is None:
        raise TypeError("branchify_hf(method, model) needs the model (an nn.Module)")
    return ("one" if method is None else method), model


def branchify_hf(*args: str | nn.Module, method: str | None = None, model: nn.Module | None = None,
                 split: str | Sequence[str] | None = None, input_names: Sequence[str] | None = None,
                 tracer: HFTracer | None = None, task: str | None = None, **overrides: Any) -> BranchedHFModel:
    """One call: a named method (``"one"``, ``"tsa"``, ``"okddip"``, ``"dml"``...) around an HF model.

    The preferred call is in :func:`branchify.method`'s order, ``branchify_hf(method, model)``.
    The former order ``branchify_hf(model, method)``, ``branchify_hf(model)`` (ONE) and the keywords
    ``method=`` / ``model=`` keep working: the positional ``nn.Module`` is the model and the
    positional string the method name, whatever their order.

    ``split`` and ``overrides`` are :func:`branchify.method`'s options (``branches=``,
    ``temperature=``, ``ramp=``, ``alpha=``..., see ``branchify.method_options(method)``),
    checked and defaulted by the same code, with the same errors. Without ``split`` the model is
    cut by :func:`default_hf_splits` (the generic rule; an encoder-decoder in its decoder).
    ``input_names`` chooses the traced inputs (:class:`HFTracer`), ``task`` overrides
    :func:`.infer_task`. Aggregators are sized from the branched model (ONE's gate: the width at
    the cut).

    Examples:
        >>> model = branchify_hf("one", BertForSequenceClassification(cfg),
        ...                      split="bert.encoder.layer.1", branches=4)   # doctest: +SKIP
        >>> model(input_ids=ids, attention_mask=mask, labels=y).loss       # doctest: +SKIP
    """
    method, model = _method_and_model(args, method, model)
    if tracer is None:
        tracer = HFTracer(input_names=input_names)
    elif input_names is not None:
        raise ValueError("pass input_names to the HFTracer you give (HFTracer(input_names=[...])), "
                         "not to branchify_hf as well")
    options = {**overrides, "tracer": tracer}
    if split is not None:
        options["split"] = split
    resolved = resolve(method, model, options)
    reason = resolved.split_reason
    if reason is not None:
        decoder = _decoder_default(model, resolved.spec.splits)
        if decoder is not None:
            options = {**{k: v for k, v in options.items() if k != "splits"}, "split": decoder[0]}
            resolved, reason = resolve(method, model, options), decoder[1]
    branched = branchify(model, resolved.spec, **resolved.branchify_kwargs)
    branched.split_reason = reason
    apply_model_options(branched, resolved.model_options)
    okd = OnlineKD(branched, resolved.aggregator, **resolved.loss_kwargs)
    return BranchedHFModel(branched, okd, model, task=task)
