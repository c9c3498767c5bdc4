"""The user-facing online-KD loss: ``okd(model(x), y) -> LossOutput(total, parts)``."""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .contract import LeafModel
from .functional import cross_entropy, kl_div_logits, kl_div_mixture, valid_mask
from .outputs import (
    BranchedOutput,
    KDTerm,
    Targets,
    classifier_logits,
    teacher_logits,
    with_labels,
    with_teacher_logits,
)
from .schedules import Constant, Schedule, as_schedule
from .token_chunks import check_token_chunk, chunked_terms, count_distinct, resolve_chunk
from .utils import no_autocast
from .validation import check_labels


@dataclass
class LossOutput:
    """The loss to backpropagate and its named, detached parts (for logging as they are).

    Parts: ``"ce/leaf{k}"`` (leaf cross-entropies), ``"ce/<name>"`` (aggregator teachers, e.g.
    ``"ce/teacher"``, ``"ce/ta1"``), ``"kd/<term>"`` (each ``T^2 * KL`` before its weight),
    ``"ext/leaf{k}"`` (external teacher KL), the weighted totals ``"loss/ce"``, ``"loss/kd"``,
    ``"loss/ext"`` (they sum to ``total``), and the ramp value ``"ramp"``.
    """

    total: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


def _teacher_logits(result: Any, target: int = 0) -> torch.Tensor:
    """Logits from whatever a teacher returns: a tensor, a BranchedOutput (its ``target`` leaf),
    an object with ``.logits`` (Hugging Face), or a tuple whose first item is the logits."""
    if isinstance(result, BranchedOutput):
        return result.logits[target]
    logits = classifier_logits(result)
    if logits is not None:
        return logits
    raise TypeError(f"the external teacher returned {type(result).__name__}; expected logits (a tensor), "
                    f"an object with .logits, or a tuple whose first item is the logits")


def _leaf_model(model: Any) -> LeafModel:
    """``model`` itself, or a clear error for wrappers and other objects."""
    if isinstance(model, LeafModel):
        return model
    inner = getattr(model, "module", None)
    if isinstance(inner, LeafModel):  # DistributedDataParallel / FSDP1 / DataParallel keep .module
        raise TypeError(
            f"OnlineKD got a {type(model).__name__} around a {type(inner).__name__}: build the loss on the "
            f"unwrapped model first and wrap it afterwards - okd = OnlineKD(model, aggregator); model = "
            f"{type(model).__name__}(model) - because attaching the aggregator adds parameters, and a "
            f"wrapper only synchronises the parameters it saw when it was built")
    raise TypeError(f"OnlineKD needs a branched model (BranchedModel, Cohort or DistributedCohort), got "
                    f"{type(model).__name__}; build one with branchify.branchify(model, spec) or branchify.method()")


class OnlineKD:
    """Online knowledge distillation loss over a branched model's leaves.

    ``total = ce_weight * [sum_k CE(z_k) + sum_n CE(teacher_n)]
    + kd_weight * ramp(e) * sum_terms weight * T^2 * KL(teacher || student)
    + teacher_weight * sum_k T_t^2 * KL(p_ext || p_k)``.

    The teachers come from the model's aggregator, which the *model* owns and runs in its forward
    (``out.targets``, see :mod:`branchify.contract`); passing ``aggregator`` here attaches it to the
    model (``model.attach(aggregator)``). The loss itself holds no module of the model, so it can
    be pickled or rebuilt freely; :meth:`state_dict` holds its schedule position. Everything is
    computed in at least float32 with autocast disabled, so bf16/fp16 autocast is safe. It
    compiles with ``torch.compile(fullgraph=True)``: the ramp is evaluated in Python when the
    epoch is set and written into a small tensor that a compiled call reads, so a ramp that moves
    every step neither recompiles nor creates a CPU scalar inside a CUDA graph.

    Args:
        model: the branched model (a :class:`~branchify.contract.LeafModel`), before any
            DDP/FSDP wrapping.
        aggregator: attached to ``model`` if given; ``None`` keeps the model's (possibly none:
            then the leaves train independently, CE only, plus the external teacher if given).
        temperature: T of every KD term (multiplied in as ``T^2``).
        ce_weight: multiplies every cross-entropy (leaves and aggregator teachers).
        kd_weight: multiplies the KD terms.
        ramp: schedule of the KD weight: ``None`` (constant 1), an int (sigmoid ramp over that
            many epochs), a float in (0, 1] (over that fraction of the run), or a
            :class:`~branchify.schedules.Schedule`. Drive it with :meth:`set_epoch` / :meth:`set_step`.
        detach: ``None`` keeps each aggregator's documented default; ``True``/``False``
            forces every KD term's teacher to be (not) detached.
        teacher: an optional frozen pre-trained model (e.g. OKDDip+KD). It lives on this loss
            object - never in ``model.state_dict()``, never trained, never exported; it is put in
            eval mode with ``requires_grad=False`` and run under ``no_grad`` on ``inputs``.
        teacher_weight: weight of the external teacher's KD terms (not ramped).
        teacher_temperature: T for the external teacher (default: ``temperature``).
        token_chunk: how token-level CE and KD terms are computed: ``"auto"`` (default) computes
            them in chunks of tokens (:mod:`branchify.token_chunks`: same values and gradients,
            no vocabulary-sized temporaries for all tokens at once) when the labels are
            token-level and positions x vocabulary x logits tensors reach
            :data:`~branchify.token_chunks.AUTO_MIN_ELEMENTS`; an int chunks with that many
            tokens per chunk; ``None`` never chunks. Classification labels ``[B]`` are chunked
            only with an explicit int.
        ce_weights: per aggregator teacher name (``out.targets.ce``), the weight of its
            cross-entropy instead of ``ce_weight`` (OKDPH weighs its hybrid's CE apart).

    Examples:
        >>> okd = OnlineKD(model, Gate(), temperature=3.0, ramp=80 / 300)    # doctest: +SKIP
        >>> okd.set_epoch(epoch, epochs)                                       # doctest: +SKIP
        >>> loss = okd(model(x), y); loss.total.backward(); loss.parts["kd/leaf0"]  # doctest: +SKIP
    """

    def __init__(self, model: Any, aggregator: Any = None, *, temperature: float = 3.0,
                 ce_weight: float = 1.0, kd_weight: float = 1.0, ramp: Schedule | int | float | None = None,
                 detach: bool | None = None, teacher: nn.Module | None = None, teacher_weight: float = 1.0,
                 teacher_temperature: float | None = None, token_chunk: int | str | None = "auto",
                 ce_weights: dict[str, float] | None = None) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if teacher_temperature is not None and not teacher_temperature > 0:
            raise ValueError(f"teacher_temperature must be > 0, got {teacher_temperature}")
        if detach not in (None, True, False):
            raise ValueError(f"detach must be None (aggregator default), True or False, got {detach!r}")
        if teacher is not None and teacher is model:
            raise ValueError("teacher is the branched model itself; pass a separate pre-trained model")
        leaf_model = _leaf_model(model)
        self.token_chunk = check_token_chunk(token_chunk)
        schedule = as_schedule(ramp)  # validated before the model is touched
        if aggregator is not None:
            leaf_model.attach(aggregator)
        self.temperature = float(temperature)
        self.ce_weight = float(ce_weight)
        self.ce_weights = {str(k): float(v) for k, v in (ce_weights or {}).items()}
        # The model's epoch-driven parts (WeightFusion's fuse-back) follow set_epoch; weak, so the
        # loss still holds no module of the model (dropped when the loss is pickled).
        self._model = weakref.ref(leaf_model)
        self.kd_weight = float(kd_weight)
        self.ramp = schedule
        self.detach = detach
        self.teacher_weight = float(teacher_weight)
        self.teacher_temperature = float(teacher_temperature) if teacher_temperature is not None else self.temperature
        self.num_leaves = leaf_model.num_leaves
        self.target = leaf_model.target
        self.epoch: float | None = None
        self.total_epochs: int | None = None
        ref = next(iter(leaf_model.parameters()), None)
        # The ramp as a tensor a compiled step reads (updated in place; see the class docstring).
        self._ramp_tensor = torch.ones((), device=ref.device if ref is not None else None)
        self._ramp_value: float | None = None
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
        self._refresh()

    # ------------------------------------------------------------------ progress
    def set_epoch(self, epoch: float, total_epochs: int | None = None) -> None:
        """Tell the loss the current epoch (from 0) and the run length (for relative ramps).

        Examples:
            >>> okd.set_epoch(0, 300)    # doctest: +SKIP
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if total_epochs is not None:
            if isinstance(total_epochs, bool) or total_epochs < 1:
                raise ValueError(f"total_epochs must be >= 1, got {total_epochs}")
            self.total_epochs = int(total_epochs)
        self.epoch = float(epoch)
        self._refresh()
        model = self._model() if self._model is not None else None
        fusion = model._modules.get("fusion") if model is not None else None
        if fusion is not None:
            fusion.on_epoch(self.epoch, self.total_epochs)

    def set_step(self, step: int, steps_per_epoch: int, total_epochs: int | None = None) -> None:
        """Tell the loss the global optimisation step (from 0): epoch = ``step / steps_per_epoch``.

        Gives a ramp that moves every step instead of once per epoch.

        Examples:
            >>> okd.set_step(global_step, len(loader), total_epochs=epochs)   # doctest: +SKIP
        """
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.set_epoch(step / steps_per_epoch, total_epochs)

    def ramp_value(self) -> float:
        """The current KD ramp weight ``w(e)``."""
        if self.epoch is None:
            if isinstance(self.ramp, Constant):
                return self.ramp.value
            raise RuntimeError(f"the KD weight follows {self.ramp!r} but no epoch was given: call "
                               f"okd.set_epoch(epoch, total_epochs) at the start of every epoch (or "
                               f"okd.set_step(...)), or pass ramp=None")
        return self.ramp(self.epoch, self.total_epochs)

    def _match_ramp_tensor(self, logits: torch.Tensor) -> None:
        """Keep the ramp tensor on the logits' device and in their dtype (at least float32), so a
        float64 model's ramp weight is float64, not a float32 rounding of it."""
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        if self._ramp_tensor.device != logits.device or self._ramp_tensor.dtype != dtype:
            value = 1.0 if self._ramp_value is None else self._ramp_value
            self._ramp_tensor = torch.full((), value, dtype=dtype, device=logits.device)

    def _refresh(self) -> None:
        """Evaluate the ramp (in Python, outside any compiled graph) into the ramp tensor."""
        try:
            value = self.ramp_value()
        except (RuntimeError, ValueError):  # raised again, with its message, when the loss needs it
            value = None
        if value is not None and value != self._ramp_value:
            with torch.no_grad():  # fill_ with a Python scalar: no host-to-device copy
                self._ramp_tensor.fill_(value)
        self._ramp_value = value

    def state_dict(self) -> dict[str, Any]:
        """The schedule position (what a resumed run needs to continue the ramp).

        Examples:
            >>> torch.save({"model": model.state_dict(), "okd": okd.state_dict()}, path)   # doctest: +SKIP
        """
        return {"epoch": self.epoch, "total_epochs": self.total_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s schedule position."""
        unknown = set(state) - {"epoch", "total_epochs"}
        if unknown:
            raise ValueError(f"OnlineKD.load_state_dict: unknown keys {sorted(unknown)}; expected 'epoch' and "
                             f"'total_epochs' (from OnlineKD.state_dict())")
        self.epoch = None if state.get("epoch") is None else float(state["epoch"])
        self.total_epochs = state.get("total_epochs")
        self._refresh()

    def to(self, device: torch.device | str) -> "OnlineKD":
        """Move the ramp tensor (and the external teacher) to ``device``; eager calls do it by themselves."""
        self._ramp_tensor = self._ramp_tensor.to(device)
        if self.teacher is not None:
            self.teacher.to(device)
        return self

    # ------------------------------------------------------------------ the loss
    def _detach_of(self, term: KDTerm) -> bool:
        if self.detach is not None:
            return self.detach
        return True if term.detach is None else term.detach

    def term_loss(self, term: KDTerm, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``T^2 * KL(teacher || student)`` of one KD term with this loss's detach rule applied.

        Useful to inspect or test one term on its own (``weight``, ramp and ``kd_weight`` are not
        applied). ``mask`` marks the positions that count (see :func:`branchify.functional.valid_mask`).

        Examples:
            >>> term = model(x).targets.kd[0]; okd.term_loss(term)     # doctest: +SKIP
        """
        if term.label_rule is not None:
            raise ValueError(f"KD term {term.name!r}: its teacher depends on the labels ({term.label_rule!r}); "
                             f"apply branchify.outputs.with_labels(targets, y) first, or use okd(out, y)")
        detach = self._detach_of(term)
        teacher = teacher_logits(term.teacher)  # a LinearTeacher is formed here
        teacher = teacher.detach() if detach else teacher
        if term.is_mixture:
            log_w = term.teacher_log_weights
            log_w = log_w.detach() if detach else log_w  # type: ignore[union-attr]
            return kl_div_mixture(teacher, log_w, term.student, self.temperature, mask)
        return kl_div_logits(teacher, term.student, self.temperature, mask)

    def __call__(self, out: BranchedOutput, y: torch.Tensor, inputs: Any = None) -> LossOutput:
        """Compute the loss for one batch.

        Args:
            out: the branched model's output (its ``targets`` hold the aggregator's teachers).
            y: integer class labels, ``[B]`` or token-level ``[B, L]`` (``-100`` = ignore).
            inputs: the model inputs, needed only with an external ``teacher``: a tensor, a
                tuple (positional arguments) or a dict (keyword arguments).
        """
        if not isinstance(out, BranchedOutput):
            raise TypeError(f"okd(out, y) expects the BranchedOutput returned by the branched model, "
                            f"got {type(out).__name__}")
        if out.num_leaves != self.num_leaves:
            raise ValueError(f"the output has {out.num_leaves} leaves but the model this loss was built "
                             f"for has {self.num_leaves}")
        if out.targets is None:
            raise ValueError("this output has no teacher targets (out.targets is None): pass the output of the "
                             "branched model's forward, or model.aggregate(out) for an output built by hand")
        if not torch.compiler.is_compiling():
            check_labels(y, out.logits[0])
            self._match_ramp_tensor(out.logits[0])
        with no_autocast(out.logits[0].device):
            return self._loss(out, with_labels(out.targets, y), y, inputs)

    def _loss(self, out: BranchedOutput, targets: Targets, y: torch.Tensor, inputs: Any) -> LossOutput:
        parts: dict[str, torch.Tensor] = {}
        mask = valid_mask(y, out.logits[0])
        chunked = self._chunked(out, targets, y)
        if chunked is None:  # unchunked: a LinearTeacher is formed once, for its CE and KD terms
            targets = with_teacher_logits(targets)
        ce_values = iter(chunked.ce) if chunked is not None else None
        kd_values = iter(chunked.kd) if chunked is not None else None
        ce_total = out.logits[0].new_zeros((), dtype=torch.float32)
        for k, z in enumerate(out.logits):
            ce = next(ce_values) if ce_values is not None else cross_entropy(z, y)
            parts[f"ce/leaf{k}"] = ce
            ce_total = ce_total + ce
        own = out.logits[0].new_zeros((), dtype=torch.float32)  # teachers weighted by ce_weights
        for name, z in targets.ce.items():
            ce = next(ce_values) if ce_values is not None else cross_entropy(z, y)
            parts[f"ce/{name}"] = ce
            if name in self.ce_weights:
                own = own + self.ce_weights[name] * ce
            else:
                ce_total = ce_total + ce
        total = self.ce_weight * ce_total + own
        parts["loss/ce"] = total
        kd_total = out.logits[0].new_zeros((), dtype=torch.float32)
        for term in targets.kd:
            kl = next(kd_values) if kd_values is not None and not term.is_mixture else self.term_loss(term, mask)
            parts[f"kd/{term.name}"] = kl
            kd_total = kd_total + term.weight * kl
        if targets.kd:
            # A tensor the compiled graph reads (its Python float would be guarded on: a recompile
            # whenever the ramp moves). Eager calls with no evaluable ramp raise ramp_value()'s error.
            ramp = self._ramp_tensor if torch.compiler.is_compiling() or self._ramp_value is not None \
                else self.ramp_value()
            kd_total = self.kd_weight * ramp * kd_total
            parts["ramp"] = ramp.detach().clone()
        else:
            parts["ramp"] = kd_total.detach().clone()  # no KD terms: the KD weight is 0
        parts["loss/kd"] = kd_total
        total = total + kd_total
        if self.teacher is not None:
            ext_total = self._external(out, inputs, mask, parts)
            parts["loss/ext"] = ext_total
            total = total + ext_total
        return LossOutput(total=total, parts={k: v.detach() for k, v in parts.items()})

    def _chunked(self, out: BranchedOutput, targets: Targets, y: torch.Tensor) -> Any:
        """The CE and (non-mixture) KD term values computed in token chunks, or ``None`` (unchunked)."""
        plain = [t for t in targets.kd if not t.is_mixture]
        tensors = count_distinct([*out.logits, *targets.ce.values(), *(t.teacher for t in plain)])
        chunk = resolve_chunk(getattr(self, "token_chunk", "auto"), y, out.logits[0].shape[-1], tensors)
        if chunk is None:
            return None
        return chunked_terms(out.logits, list(targets.ce.values()),
                             [(t.teacher, t.student, self._detach_of(t)) for t in plain], y,
                             temperature=self.temperature, chunk=chunk)

    def _external(self, out: BranchedOutput, inputs: Any, mask: torch.Tensor | None,
                  parts: dict[str, torch.Tensor]) -> torch.Tensor:
        if inputs is None:
            raise ValueError("this OnlineKD has an external teacher, which needs the model inputs: call "
                             "okd(out, y, inputs=x) with the same inputs you gave the model")
        teacher = self.teacher
        assert teacher is not None
        if teacher.training:  # a user's .train() elsewhere must not leak into the frozen teacher
            teacher.eval()
        ref = next(iter(teacher.parameters()), None)
        if ref is not None and ref.device != out.logits[0].device:
            teacher.to(out.logits[0].device)
        with torch.no_grad():
            if isinstance(inputs, dict):
                result = teacher(**inputs)
            elif isinstance(inputs, (tuple, list)):
                result = teacher(*inputs)
            else:
                result = teacher(inputs)
        target = getattr(getattr(teacher, "spec", None), "target", 0)
        t_logits = _teacher_logits(result, target).float()
        total = out.logits[0].new_zeros((), dtype=torch.float32)
        for k, z in enumerate(out.logits):
            kl = kl_div_logits(t_logits, z, self.teacher_temperature, mask)
            parts[f"ext/leaf{k}"] = kl
            total = total + kl
        return self.teacher_weight * total

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_model": None}  # a weak reference does not pickle

    def __repr__(self) -> str:
        return (f"OnlineKD(temperature={self.temperature}, ce_weight={self.ce_weight}, kd_weight={self.kd_weight}, "
                f"ramp={self.ramp!r}, detach={self.detach}, teacher={'yes' if self.teacher is not None else None})")
