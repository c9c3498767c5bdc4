"""A branched Hugging Face model that the unchanged ``transformers.Trainer`` can train.

The Trainer trains a branched model when the model

* takes the usual batch keyword arguments (``input_ids``, ``attention_mask``, ``pixel_values``,
  ``labels``, ``decoder_input_ids``...),
* returns a ``transformers.modeling_outputs`` ``ModelOutput`` whose ``loss`` is the online-KD
  loss (when labels are given) and whose ``logits`` are the target leaf's,

which is what :class:`BranchedHFModel` does (scoring per task: :mod:`.tasks`).

Examples:
    >>> bm, okd = branchify.method("one", bert, split="bert.encoder.layer.2")   # doctest: +SKIP
    >>> model = BranchedHFModel(bm, okd, bert)                                  # doctest: +SKIP
    >>> model(input_ids=ids, labels=y).loss.backward()                          # doctest: +SKIP
"""
from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import (
    CausalLMOutput,
    ImageClassifierOutput,
    ModelOutput,
    Seq2SeqLMOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)

from ...distributed import mean_over_ranks
from ...export import write_info
from ...model import BranchedModel
from ...online_kd import LossOutput, OnlineKD
from ...outputs import BranchedOutput
from .tasks import TASKS, infer_task, shift_output, shift_right, tie_groups, unalias_state_dict

__all__ = ["BranchedHFModel"]


def keep_unsaved_frozen(branched: BranchedModel, model: nn.Module) -> list[str]:
    """Re-freeze, in every replica, the frozen parameters that transformers never saves.

    ``save_pretrained`` leaves out ``model._keys_to_ignore_on_save`` (Marian's sinusoidal position
    tables, frozen by design) and ``from_pretrained`` rebuilds them. branchify makes a
    re-initialised replica's frozen parameters trainable (a frozen backbone replica would be
    useless); for these tables that would train values the saved export silently drops, so
    they stay frozen. Returns the names re-frozen (once per replica).

    Examples:
        >>> keep_unsaved_frozen(bm, marian)                         # doctest: +SKIP
        ['model.decoder.embed_positions.weight']
    """
    unsaved = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    frozen = {n for n, p in model.named_parameters() if n in unsaved and not p.requires_grad}
    names = []
    for segment in branched.segments.values():
        for n, p in segment.named_parameters():
            if n in frozen and p.requires_grad:
                p.requires_grad_(False)
                names.append(n)
    return names


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

    Examples:
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
        self._log_counts: dict[str, int] = {}
        self._register_state_dict_hook(unalias_state_dict)
        self.refrozen = keep_unsaved_frozen(branched, model)

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
            decoder_input_ids = shift_right(labels, getattr(self.config, "pad_token_id", None),
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
            out = shift_output(out)
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
            self._log_counts[k] = self._log_counts.get(k, 0) + 1

    def pop_logged_parts(self) -> dict[str, float]:
        """Mean of every loss part over the training forwards since the last call (then reset).

        Under ``torch.distributed`` the mean is over the forwards of every rank (sums and counts
        are all-reduced), so every rank must call it - :class:`BranchifyCallback` does, from
        ``on_log``, which the Trainer runs on every rank.

        Examples:
            >>> model.pop_logged_parts()["loss/kd"]                        # doctest: +SKIP
            0.0132
        """
        ref = next(iter(self.parameters()), None)
        means = mean_over_ranks(self._log_sums, self._log_counts, ref.device if ref is not None else None)
        self._log_sums, self._log_counts = {}, {}
        return means

    # -------------------------------------------------------------- export
    def export_pretrained(self, leaf: int | None = None) -> nn.Module:
        """The leaf (default: the target) as an instance of the original transformers class.

        Loaded with a strict ``state_dict``. Weights that are tied in the original model (the
        input embeddings and the LM head) but became different tensors because they sit on
        both sides of a cut are untied in the export (``config.tie_word_embeddings = False``),
        so ``save_pretrained`` / ``from_pretrained`` keep both; tied weights that no traced
        operation reads (T5's ``shared``) are filled from their tied partner.

        Examples:
            >>> student = model.export_pretrained()                          # doctest: +SKIP
            >>> student.save_pretrained("student"); type(student).from_pretrained("student")  # doctest: +SKIP
        """
        sd = self.branched.export_state_dict(leaf)
        config = copy.deepcopy(self._export_config)
        untie = self._fill_tied(sd)
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

    def _fill_tied(self, sd: dict[str, torch.Tensor]) -> list[list[str]]:
        """Give every tied name the value of a partner the traced forward reads; return the groups
        whose read members differ (they must be untied).

        A name no traced operation reads (T5's / Marian's ``shared``, which runs as
        ``encoder.embed_tokens``) still holds the original's value in ``export_state_dict``: it is
        overwritten by its trained partner rather than counted as a difference.
        """
        executed = {k for segment in self.branched.segments.values() for k in segment.state_dict()}
        untie = []
        for group in self._tie_groups:
            read = [k for k in group if k in sd and k in executed] or [k for k in group if k in sd]
            if not read:
                continue
            ref = sd[read[0]]
            if any(not torch.equal(sd[k], ref) for k in read[1:]):
                untie.append(read)
            for k in group:
                if k not in read:
                    sd[k] = ref.clone()
        return untie

    def save_target(self, directory: str | os.PathLike, leaf: int | None = None) -> str:
        """``save_pretrained`` the exported leaf (default: the target) into ``directory``.

        Also writes ``branchify.json`` next to the weights (:mod:`branchify.export`'s schema with
        ``format="hf"``: the class, the leaf, the spec and ``tie_word_embeddings``).

        Examples:
            >>> model.save_target("runs/exported-target")                    # doctest: +SKIP
        """
        directory = os.fspath(directory)
        exported = self.export_pretrained(leaf)
        exported.save_pretrained(directory)
        write_info(directory, self.model_class, format="hf", leaf=self.target if leaf is None else leaf,
                   spec=self.branched.spec,
                   extra={"tie_word_embeddings": getattr(exported.config, "tie_word_embeddings", None)})
        return directory

    def extra_repr(self) -> str:
        return f"task={self.task!r}, class={self.model_class.__name__}, inputs={self.input_names}"
