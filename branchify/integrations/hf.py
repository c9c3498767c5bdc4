"""Hugging Face integration: a Trainer-ready branched model, a callback, ``save_pretrained`` export.

The unchanged ``transformers.Trainer`` trains a branched model when the model

* takes the usual batch keyword arguments (``input_ids``, ``attention_mask``, ``pixel_values``,
  ``labels``, ``decoder_input_ids``...),
* returns a ``transformers.modeling_outputs`` ``ModelOutput`` whose ``loss`` is the online-KD
  loss (when labels are given) and whose ``logits`` are the target leaf's,

which is what :class:`BranchedHFModel` does. :class:`BranchifyCallback` advances the loss's
epoch schedules from the Trainer's state (so a resumed run continues where it stopped), adds
the loss parts to the Trainer's logs, and writes the exported target with ``save_pretrained``
into every checkpoint and at the end of training, where ``from_pretrained`` of the original
class (or the matching ``AutoModelFor...``) loads it strictly.

Token-level outputs (causal LM, seq2seq, token classification) use per-token CE and KL,
masked where the label is ``-100`` and averaged over the real tokens; for a causal LM the
logits at position ``i`` are scored against label ``i + 1`` (the usual shift), and a seq2seq
model without ``decoder_input_ids`` gets them from the labels shifted right.

Example:
    >>> from transformers import Trainer, TrainingArguments
    >>> from branchify.integrations.hf import BranchifyCallback, branchify_hf
    >>> model = branchify_hf(BertForSequenceClassification(cfg), "one",
    ...                      split="bert.encoder.layer.2")                  # doctest: +SKIP
    >>> trainer = Trainer(model=model, args=TrainingArguments("out", report_to=[]),
    ...                   train_dataset=ds, callbacks=[BranchifyCallback()])  # doctest: +SKIP
    >>> trainer.train()                                                      # doctest: +SKIP
    >>> BertForSequenceClassification.from_pretrained("out/exported-target") # doctest: +SKIP
"""
from __future__ import annotations

import copy
import json
import os
from collections import defaultdict
from dataclasses import replace
from typing import Any, Sequence

import torch
from torch import nn

try:
    from transformers import TrainerCallback
    from transformers.modeling_outputs import (CausalLMOutput, ImageClassifierOutput, ModelOutput,
                                               Seq2SeqLMOutput, SequenceClassifierOutput, TokenClassifierOutput)
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError("branchify.integrations.hf needs Hugging Face transformers (and accelerate for the "
                      "Trainer): pip install 'branchify[hf]'") from exc

from branchify.build import branchify
from branchify.model import BranchedModel
from branchify.online_kd import LossOutput, OnlineKD
from branchify.outputs import BranchedOutput

from .hf_tracer import HFTracer, coarse_leaf_paths

__all__ = ["BranchedHFModel", "BranchifyCallback", "branchify_hf", "default_hf_splits", "infer_task",
           "EXPORT_SUBDIR"]

EXPORT_SUBDIR = "exported-target"
"""Folder (in ``output_dir`` and in every checkpoint) that receives the exported target."""

TASKS = ("classification", "token", "causal", "seq2seq")

_BATCH_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "pixel_values",
                 "input_features", "input_values", "decoder_input_ids", "decoder_attention_mask")


# ---------------------------------------------------------------------- helpers
def infer_task(model: nn.Module) -> str:
    """How a transformers model's logits are scored: one of :data:`TASKS`.

    ``"seq2seq"`` (encoder-decoder), ``"causal"`` (a causal LM: labels shifted by one),
    ``"token"`` (token classification) or ``"classification"`` (one label per example).

    Example:
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


def hidden_size(model: nn.Module) -> int | None:
    """Width of the hidden states between layers (``config.hidden_size`` / ``d_model`` / ``n_embd``)."""
    config = getattr(model, "config", None)
    for attr in ("hidden_size", "d_model", "n_embd", "dim"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None


def default_hf_splits(model: nn.Module, levels: int) -> list[str]:
    """The last ``levels`` layers of the model's last stack of layers (decoder for seq2seq).

    ONE-style methods (one level) then branch the last layer plus the head, TSA (two levels)
    the last two layers.

    Example:
        >>> default_hf_splits(bert_with_12_layers, 2)                      # doctest: +SKIP
        ['bert.encoder.layer.10', 'bert.encoder.layer.11']
    """
    stacks: dict[str, list[str]] = {}
    for path in coarse_leaf_paths(model):
        parent, _, idx = path.rpartition(".")
        if idx.isdigit():
            stacks.setdefault(parent, []).append(path)
    if not stacks:
        raise ValueError(f"cannot guess split points for {type(model).__name__}: it has no stack of layers; "
                         f"pass split=<layer path> (branchify.split_points(model) lists them)")
    last = list(stacks.values())[-1]
    if len(last) < levels:
        raise ValueError(f"{type(model).__name__} has {len(last)} layer(s) in its last stack but the method "
                         f"needs {levels} split points; pass split=[...] explicitly")
    return last[-levels:]


def tie_groups(model: nn.Module) -> list[list[str]]:
    """Names of parameters that are one tensor in ``model`` (tied embeddings, shared heads)."""
    by_id: dict[int, list[str]] = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id[id(p)].append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _shift_right(labels: torch.Tensor, pad_token_id: int | None, start_token_id: int | None) -> torch.Tensor:
    """``decoder_input_ids`` from seq2seq labels: start token, then labels[:-1] (-100 -> pad)."""
    if start_token_id is None:
        raise ValueError("the config has no decoder_start_token_id; pass decoder_input_ids explicitly")
    shifted = labels.new_zeros(labels.shape)
    shifted[:, 1:] = labels[:, :-1].clone()
    shifted[:, 0] = start_token_id
    return shifted.masked_fill(shifted == -100, pad_token_id if pad_token_id is not None else 0)


def _shift_output(out: BranchedOutput) -> BranchedOutput:
    """Drop the last position of token-level logits / features (causal LM: predict the next token)."""
    def cut(t: torch.Tensor | None) -> torch.Tensor | None:
        return t[:, :-1] if t is not None and t.dim() >= 3 else t

    return replace(out, logits=[z[:, :-1] for z in out.logits], features=[cut(f) for f in out.features])


def _unalias_state_dict(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> dict:
    """State-dict hook: clone tensors that share storage with an earlier entry.

    Tied parameters inside one segment (e.g. T5's encoder and decoder token embeddings) would
    otherwise make ``safetensors`` (used by the Trainer's checkpoints) refuse the state dict.
    Loading writes the same values into both names, so nothing changes on reload.
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


# ---------------------------------------------------------------------- the model
class BranchedHFModel(nn.Module):
    """A branched Hugging Face model that the unchanged ``transformers.Trainer`` can train.

    ``forward(**batch)`` returns a ``ModelOutput`` (``SequenceClassifierOutput``,
    ``ImageClassifierOutput``, ``TokenClassifierOutput``, ``CausalLMOutput`` or
    ``Seq2SeqLMOutput``) with ``loss`` = the online-KD total when ``labels`` are given and
    ``logits`` = the target leaf's logits. The whole tree (and the aggregator) lives in
    ``self.branched``; ``self.okd`` is the loss object. Build it with :func:`branchify_hf`, or
    wrap a hand-composed ``(BranchedModel, OnlineKD)`` pair.

    Args:
        branched: the branched model (from :func:`branchify.branchify` on ``model``).
        okd: its loss (:class:`~branchify.OnlineKD`).
        model: the original transformers model (read for its class, config and tied weights;
            not kept).
        task: override :func:`infer_task`.

    Example:
        >>> bm, okd = branchify.method("tsa", vit, split=["vit.layers.2", "vit.layers.3"])  # doctest: +SKIP
        >>> model = BranchedHFModel(bm, okd, vit)                                          # doctest: +SKIP
        >>> out = model(pixel_values=x, labels=y); out.loss.backward()                     # doctest: +SKIP
        >>> model.export_pretrained().save_pretrained("vit-student")                       # doctest: +SKIP
    """

    accepts_loss_kwargs = False  # the loss is a mean already: the Trainer scales it for accumulation

    def __init__(self, branched: BranchedModel, okd: OnlineKD, model: nn.Module, *, task: str | None = None) -> None:
        super().__init__()
        if not isinstance(branched, BranchedModel):
            raise TypeError(f"branched must be a branchify.BranchedModel, got {type(branched).__name__}")
        if not isinstance(okd, OnlineKD):
            raise TypeError(f"okd must be a branchify.OnlineKD, got {type(okd).__name__}")
        if not hasattr(model, "config") or not hasattr(type(model), "from_pretrained"):
            raise TypeError(f"model must be the original transformers PreTrainedModel, got {type(model).__name__}")
        if branched.spec.deepen:
            raise ValueError("deepened leaves (spec.deepen) change the layer count, so they cannot be exported "
                             "with the original config; BranchedHFModel supports specs without deepen")
        task = task or infer_task(model)
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if task == "classification" and (getattr(model.config, "num_labels", 2) < 2 or
                                          getattr(model.config, "problem_type", None) in
                                          ("regression", "multi_label_classification")):
            raise ValueError("online KD distils class distributions: the model must be a single-label classifier "
                             "with num_labels >= 2 (not regression / multi-label)")
        self.branched = branched
        self.okd = okd
        self.task = task
        self.config = copy.deepcopy(model.config)  # the Trainer may set attributes (use_cache) on it
        self._export_config = copy.deepcopy(model.config)
        self.model_class = type(model)
        self.main_input_name = getattr(model, "main_input_name", "input_ids")
        # (node, argument, default) of the traced inputs, in order.
        self.input_names = [arg for _, arg, _ in branched.model_inputs]
        self._tie_groups = tie_groups(model)
        self._log_sums: dict[str, torch.Tensor] = {}
        self._log_count = 0
        self._register_state_dict_hook(_unalias_state_dict)

    # -------------------------------------------------------------- forward
    @property
    def target(self) -> int:
        """Index of the deployed leaf (``spec.target``)."""
        return self.branched.spec.target

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, input_features: torch.Tensor | None = None,
                input_values: torch.Tensor | None = None, decoder_input_ids: torch.Tensor | None = None,
                decoder_attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> ModelOutput:
        """Run the tree; ``loss`` is the online-KD loss when ``labels`` are given."""
        if self.task == "seq2seq" and decoder_input_ids is None and labels is not None:
            decoder_input_ids = _shift_right(labels, getattr(self.config, "pad_token_id", None),
                                             getattr(self.config, "decoder_start_token_id", None))
        given = {k: v for k, v in dict(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=position_ids, pixel_values=pixel_values, input_features=input_features,
            input_values=input_values, decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask).items() if v is not None}
        unexpected = sorted(set(given) - set(self.input_names))
        if unexpected:
            raise TypeError(f"the branched model was traced with inputs {self.input_names} and cannot use "
                            f"{unexpected}; trace with HFTracer(input_names=[...]) (branchify_hf(..., "
                            f"input_names=[...])) to include them, or drop them from the batch")
        out, logits = self.branched_output(**given)
        loss = None
        if labels is not None:
            result = self.compute_loss(out, labels)
            loss = result.total
            if self.training:
                self._accumulate(result.parts)
        return self._output_class()(loss=loss, logits=logits)

    def branched_output(self, **inputs: Any) -> tuple[BranchedOutput, torch.Tensor]:
        """The tree's output with the aggregator's targets (shifted by one position for causal LMs,
        so that the teachers predict the next token too), and the target leaf's unshifted logits."""
        out = self.branched.forward_leaves(**inputs)
        logits = out.logits[self.target]  # every position, as the original model returns them
        if self.task == "causal":
            out = _shift_output(out)
        return self.branched.aggregate(out), logits

    def compute_loss(self, out: BranchedOutput, labels: torch.Tensor) -> LossOutput:
        """The online-KD loss of this wrapper's output (causal LMs: already shifted, so the labels
        drop their first position)."""
        if self.task == "causal":
            labels = labels[:, 1:]
        return self.okd(out, labels)

    def _output_class(self) -> type:
        if self.task == "causal":
            return CausalLMOutput
        if self.task == "seq2seq":
            return Seq2SeqLMOutput
        if self.task == "token":
            return TokenClassifierOutput
        return ImageClassifierOutput if self.main_input_name == "pixel_values" else SequenceClassifierOutput

    # -------------------------------------------------------------- logging
    def _accumulate(self, parts: dict[str, torch.Tensor]) -> None:
        for k, v in parts.items():
            v = v.detach().float()
            self._log_sums[k] = self._log_sums[k] + v if k in self._log_sums else v
        self._log_count += 1

    def pop_logged_parts(self) -> dict[str, float]:
        """Mean of every loss part over the training forwards since the last call (then reset).

        Example:
            >>> model.pop_logged_parts()["loss/kd"]                        # doctest: +SKIP
            0.0132
        """
        if not self._log_count:
            return {}
        means = {k: float(v) / self._log_count for k, v in self._log_sums.items()}
        self._log_sums, self._log_count = {}, 0
        return means

    # -------------------------------------------------------------- export
    def export_pretrained(self, leaf: int | None = None) -> nn.Module:
        """The leaf (default: the target) as an instance of the original transformers class.

        Loaded with a strict ``state_dict``. Weights that are tied in the original model (the
        input embeddings and the LM head) but became different tensors because they sit on
        both sides of a cut are untied in the export (``config.tie_word_embeddings = False``),
        so ``save_pretrained`` / ``from_pretrained`` keep both; tied weights that no traced
        operation reads (T5's ``shared``) are filled from their tied partner.

        Example:
            >>> student = model.export_pretrained()                          # doctest: +SKIP
            >>> student.save_pretrained("student"); type(student).from_pretrained("student")  # doctest: +SKIP
        """
        sd = self.branched.export_state_dict(leaf)
        config = copy.deepcopy(self._export_config)
        untie = []
        for group in self._tie_groups:
            present = [k for k in group if k in sd]
            if not present:
                continue
            ref = sd[present[0]]
            if any(not torch.equal(sd[k], ref) for k in present[1:]):
                untie.append(present)
            for k in group:
                sd.setdefault(k, ref.clone())
        if untie:
            if not hasattr(config, "tie_word_embeddings"):
                raise ValueError(f"tied weights {untie} differ in this leaf and the config has no "
                                 f"tie_word_embeddings switch to untie them")
            config.tie_word_embeddings = False
        device = next(iter(sd.values())).device if sd else torch.device("cpu")
        with torch.device(device):
            model = self.model_class(config)
        model.load_state_dict(sd, strict=True)
        return model.train(self.training)

    def save_target(self, directory: str | os.PathLike, leaf: int | None = None) -> str:
        """``save_pretrained`` the exported leaf (default: the target) into ``directory``.

        Also writes ``branchify.json`` (the spec and the leaf) next to the weights.

        Example:
            >>> model.save_target("runs/exported-target")                    # doctest: +SKIP
        """
        directory = os.fspath(directory)
        exported = self.export_pretrained(leaf)
        exported.save_pretrained(directory)
        info = {"spec": self.branched.spec.to_dict(), "leaf": self.target if leaf is None else leaf,
                "class": f"{self.model_class.__module__}.{self.model_class.__name__}",
                "tie_word_embeddings": getattr(exported.config, "tie_word_embeddings", None)}
        with open(os.path.join(directory, "branchify.json"), "w") as f:
            json.dump(info, f, indent=2, default=str)
        return directory

    def extra_repr(self) -> str:
        return f"task={self.task!r}, class={self.model_class.__name__}, inputs={self.input_names}"


def branchify_hf(model: nn.Module, method: str = "one", *, split: str | Sequence[str] | None = None,
                 input_names: Sequence[str] | None = None, tracer: HFTracer | None = None,
                 task: str | None = None, **overrides: Any) -> BranchedHFModel:
    """One call: a named method (``"one"``, ``"tsa"``, ``"okddip"``, ``"dml"``...) around an HF model.

    The split defaults to the last layer (one-level methods) or the last two layers (TSA)
    of the model's last stack of layers (see :func:`default_hf_splits`). ``overrides`` are the
    preset's options (``branches=``, ``temperature=``, ``ramp=``, ``alpha=``...; see
    ``branchify.methods.get_preset(method).defaults``). ONE's gate reads the trunk's hidden
    states, so it is sized from ``config.hidden_size``.

    Example:
        >>> model = branchify_hf(BertForSequenceClassification(cfg), "one",
        ...                      split="bert.encoder.layer.1", branches=4)   # doctest: +SKIP
        >>> model(input_ids=ids, attention_mask=mask, labels=y).loss       # doctest: +SKIP
    """
    from branchify.methods import MethodError, get_preset

    preset = get_preset(method)
    unknown = sorted(set(overrides) - set(preset.defaults))
    if unknown:
        raise MethodError(f"method {preset.name!r} does not take {unknown}; valid overrides: "
                          f"{sorted(preset.defaults)} (plus split, input_names, tracer, task)")
    if tracer is None:
        tracer = HFTracer(input_names=input_names)
    elif input_names is not None:
        raise ValueError("pass input_names to the HFTracer you give, not to branchify_hf")
    options = {**preset.defaults, **overrides, "tracer": tracer}
    if split is None and options.get("split") is None and preset.name != "dml":
        fanout = options.get("fanout")
        levels = len(fanout) if fanout else (2 if preset.name in ("tsa", "u_tsa") else 1)
        split = default_hf_splits(model, levels)
    if split is not None:
        options["split"] = split
    spec, aggregator, loss_kwargs = preset.build(model, options)
    if hasattr(aggregator, "channels") and getattr(aggregator, "channels") is None:
        aggregator.channels = hidden_size(model)
    branched = branchify(model, spec, model_fn=options.get("model_fn"), tracer=tracer,
                         feature_node=options.get("feature_node"))
    okd = OnlineKD(branched, aggregator, **loss_kwargs)
    return BranchedHFModel(branched, okd, model, task=task)


# ---------------------------------------------------------------------- the callback
class BranchifyCallback(TrainerCallback):
    """Trainer callback: epoch schedules, loss parts in the logs, ``save_pretrained`` export.

    * ``on_train_begin`` / ``on_step_begin``: ``okd.set_epoch(state.epoch, state.num_train_epochs)``
      - the epoch comes from the Trainer's state, so a run resumed from a checkpoint continues
      its ramps / interval schedules where it stopped.
    * ``on_log``: adds the mean of every loss part since the last log (``"okd/ce/leaf0"``,
      ``"okd/loss/kd"``, ``"okd/ramp"``...) to the training logs and to ``state.log_history``.
    * ``on_save``: writes the exported target into ``<checkpoint>/exported-target``;
      ``on_train_end``: into ``<output_dir>/exported-target`` (``save_pretrained`` format,
      loadable with ``from_pretrained`` of the original class).

    Args:
        model: the :class:`BranchedHFModel` (default: the Trainer's model, found in the
            callback arguments).
        export_subdir: folder name of the export inside checkpoints / ``output_dir``
            (``None`` disables exporting).
        log_prefix: prefix of the logged loss parts (``None`` disables logging them).

    Example:
        >>> trainer = Trainer(model=branched_hf, args=args, train_dataset=ds,
        ...                   callbacks=[BranchifyCallback()])                # doctest: +SKIP
    """

    def __init__(self, model: BranchedHFModel | None = None, *, export_subdir: str | None = EXPORT_SUBDIR,
                 log_prefix: str | None = "okd/") -> None:
        self.model = model
        self.export_subdir = export_subdir
        self.log_prefix = log_prefix

    def _find(self, kwargs: dict) -> BranchedHFModel:
        model = self.model if self.model is not None else kwargs.get("model")
        while not isinstance(model, BranchedHFModel) and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module  # DDP / accelerate wrappers
        if not isinstance(model, BranchedHFModel):
            raise TypeError(f"BranchifyCallback needs the Trainer's model to be a BranchedHFModel (from "
                            f"branchify_hf), got {type(model).__name__}")
        return model

    @staticmethod
    def _set_epoch(model: BranchedHFModel, state: Any) -> None:
        total = int(state.num_train_epochs) if state.num_train_epochs else None
        epoch = float(state.epoch or 0.0)
        model.okd.set_epoch(epoch, total if total and total >= 1 else None)

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: D102 - TrainerCallback hook
        self._set_epoch(self._find(kwargs), state)

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: D102 - TrainerCallback hook
        self._set_epoch(self._find(kwargs), state)

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D102 - TrainerCallback hook
        if self.log_prefix is None or logs is None or "loss" not in logs:
            return  # only training logs carry the parts (eval logs are eval_*)
        parts = self._find(kwargs).pop_logged_parts()
        extra = {f"{self.log_prefix}{k}": round(v, 6) for k, v in parts.items()}
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_save(self, args, state, control, **kwargs):  # noqa: D102 - TrainerCallback hook
        if self.export_subdir is None or not state.is_world_process_zero:
            return
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(checkpoint):
            self._find(kwargs).save_target(os.path.join(checkpoint, self.export_subdir))

    def on_train_end(self, args, state, control, **kwargs):  # noqa: D102 - TrainerCallback hook
        if self.export_subdir is None or not state.is_world_process_zero:
            return
        self._find(kwargs).save_target(os.path.join(args.output_dir, self.export_subdir))
