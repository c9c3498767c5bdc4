"""Hugging Face integration: the coarse tracer, a Trainer-ready branched model, a callback, export.

* :func:`branchify_hf` (``methods.py``) - a named method around a transformers model, built on
  :func:`branchify.methods.resolve` like :func:`branchify.method`;
* :class:`BranchedHFModel` (``wrapper.py``) - the branched model the unchanged
  ``transformers.Trainer`` trains (``ModelOutput`` with the online-KD loss and the target's
  logits), with ``export_pretrained`` / ``save_target``;
* :class:`BranchifyCallback` (``callback.py``) - epoch schedules from the Trainer's state, loss
  parts (averaged over ranks) in the logs, the exported target in every checkpoint;
* :class:`HFTracer` (``tracer.py`` + ``inputs.py``, ``leaves.py``, ``guards.py``,
  ``graph_passes.py``, ``proxy.py``) - the coarse fx tracer branchify picks for HF models;
* ``plugin.py`` - the ``branchify.plugins`` entry point (imports no transformers).

Names are imported on first use, so ``import branchify.integrations.hf.plugin`` needs no
transformers; using any other name without transformers raises an ``ImportError`` that says
what to install.

Examples:
    >>> from transformers import Trainer, TrainingArguments
    >>> from branchify.integrations.hf import BranchifyCallback, branchify_hf
    >>> model = branchify_hf("one", BertForSequenceClassification(cfg),
    ...                      split="bert.encoder.layer.2")                  # doctest: +SKIP
    >>> trainer = Trainer(model=model, args=TrainingArguments("out", report_to=[]),
    ...                   train_dataset=ds, callbacks=[BranchifyCallback()])  # doctest: +SKIP
    >>> trainer.train()                                                      # doctest: +SKIP
    >>> BertForSequenceClassification.from_pretrained("out/exported-target") # doctest: +SKIP
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .callback import EXPORT_SUBDIR, BranchifyCallback
    from .inputs import HFTracerError, default_input_names
    from .leaves import coarse_leaf_paths
    from .methods import branchify_hf, default_hf_splits
    from .plugin import PLUGIN, is_hf_model
    from .tasks import TASKS, infer_task
    from .tracer import HFTracer, coarse_tracer_for
    from .wrapper import BranchedHFModel

_EXPORTS = {
    "branchify_hf": "methods", "default_hf_splits": "methods",
    "BranchedHFModel": "wrapper",
    "BranchifyCallback": "callback", "EXPORT_SUBDIR": "callback",
    "HFTracer": "tracer", "coarse_tracer_for": "tracer",
    "HFTracerError": "inputs", "default_input_names": "inputs",
    "coarse_leaf_paths": "leaves",
    "infer_task": "tasks", "TASKS": "tasks",
    "PLUGIN": "plugin", "is_hf_model": "plugin",
}
_NEEDS_TRANSFORMERS = {"methods", "wrapper", "callback", "tasks"}

__all__ = ["EXPORT_SUBDIR", "PLUGIN", "TASKS", "BranchedHFModel", "BranchifyCallback", "HFTracer", "HFTracerError",
           "branchify_hf", "coarse_leaf_paths", "coarse_tracer_for", "default_hf_splits", "default_input_names",
           "infer_task", "is_hf_model"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}; it exports {__all__}")
    if module in _NEEDS_TRANSFORMERS:
        try:
            importlib.import_module("transformers")
        except ImportError as exc:
            raise ImportError(f"branchify.integrations.hf.{name} needs Hugging Face transformers (and accelerate "
                              f"for the Trainer): pip install 'branchify[hf]'") from exc
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
