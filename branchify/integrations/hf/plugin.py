"""How the core recognises, traces and initialises Hugging Face models (registered as an entry point).

Importing this module imports nothing from transformers: a model is recognised by the names in
its class hierarchy, and the coarse tracer is imported only when such a model is traced.

Examples:
    >>> from branchify.registry import plugin_for
    >>> plugin_for(bert_classifier).name                           # doctest: +SKIP
    'transformers'
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ...registry import Plugin

if TYPE_CHECKING:
    from .tracer import HFTracer


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (also custom / remote-code subclasses).

    Examples:
        >>> is_hf_model(nn.Linear(2, 2))
        False
    """
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers")
               for c in type(model).__mro__)


def _tracer(model: nn.Module) -> "HFTracer":
    from .tracer import coarse_tracer_for

    return coarse_tracer_for(model)


def hf_pretrained(model: nn.Module) -> str | None:
    """Why ``model`` holds pretrained weights - it was loaded with ``from_pretrained`` - or ``None``.

    ``from_pretrained`` records where the weights came from in ``config.name_or_path``; a model
    built from a config has an empty one. A model built with ``from_config`` (or its constructor)
    from a *loaded* config carries that config's name although its weights are fresh; transformers
    5 marks the models its loader filled (``_weight_conversions``), which tells the two apart
    (older versions: the name alone decides).

    Examples:
        >>> hf_pretrained(BertForSequenceClassification(BertConfig()))          # doctest: +SKIP
        >>> hf_pretrained(AutoModel.from_pretrained("bert-base-uncased"))       # doctest: +SKIP
        "loaded with from_pretrained from 'bert-base-uncased' (config.name_or_path)"
    """
    import sys

    source = getattr(getattr(model, "config", None), "name_or_path", "") or ""
    if not source:
        return None
    version = getattr(sys.modules.get("transformers"), "__version__", "0")
    if int(version.split(".")[0]) >= 5 and not hasattr(model, "_weight_conversions"):
        return None  # the name came with a loaded config; the weights were initialised here
    return f"loaded with from_pretrained from {str(source)!r} (config.name_or_path)"


def hf_head(model: nn.Module) -> list[str] | None:
    """The task head of a Hugging Face model: its top-level children with parameters other than the
    base model (``classifier``, ``pre_classifier``, ``score``, ``lm_head``, ``cls``...); ``None`` when
    the base model is the model itself (T5, Marian), so the final Linear is used.

    Examples:
        >>> hf_head(BertForSequenceClassification(BertConfig()))      # doctest: +SKIP
        ['classifier']
    """
    base = getattr(model, "base_model_prefix", "")
    children = dict(model.named_children())
    if base not in children:
        return None
    return [name for name, m in children.items() if name != base and any(True for _ in m.parameters())] or None


PLUGIN = Plugin("transformers", matches=is_hf_model, tracer=_tracer, init="hf", pretrained=hf_pretrained,
                head=hf_head)
"""The ``branchify.plugins`` entry point ``transformers`` (see ``pyproject.toml``)."""
