"""The user-facing online-KD loss: ``okd(model(x), y) -> LossOutput(total, parts)``."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from branchify.aggregators.base import Aggregator, KDTerm, Targets
from branchify.losses import cross_entropy, kl_div_logits, kl_div_mixture, valid_mask
from branchify.outputs import BranchedOutput, classifier_logits
from branchify.schedules import Constant, IntervalSchedule, Schedule, as_schedule


@dataclass
class LossOutput:
    """The loss to backpropagate and its named, detached parts (for logging as they are).

    Parts: ``"ce/leaf{k}"`` (leaf cross-entropies), ``"ce/<name>"`` (aggregator teachers, e.g.
    ``"ce/teacher"``, ``"ce/ta1"``), ``"kd/<term>"`` (each ``T^2 * KL`` before its weight),
    ``"ext/leaf{k}"`` (external teacher KL), the weighted totals ``"loss/ce"``, ``"loss/kd"``,
    ``"loss/ext"`` (they sum to ``total``), and the schedule values ``"ramp"`` (and
    ``"alpha"``/``"beta"`` with an interval schedule).
    """

    total: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


def _first_param(module: Any) -> torch.Tensor | None:
    if isinstance(module, nn.Module):
        for p in module.parameters():
            return p
        for b in module.buffers():
            return b
    return None


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


def _cast_output(out: BranchedOutput, dtype: torch.dtype) -> BranchedOutput:
    """A view of ``out`` with every floating tensor in ``dtype`` (autograd flows through the cast)."""
    def cast(t):
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    return replace(out, logits=[cast(z) for z in out.logits], features=[cast(f) for f in out.features],
                   feature_maps=[cast(f) for f in out.feature_maps],
                   cuts={k: cast(v) for k, v in out.cuts.items()})


def _scalar(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A loss part as a 0-d float32 tensor on ``like``'s device (a copy: the schedule buffer is
    updated in place later; never a CPU tensor beside CUDA ones inside a compiled graph)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return torch.full((), value, dtype=torch.float32, device=like.device)


class OnlineKD:
    """Online knowledge distillation loss over a branched model's leaves.

    ``total = ce_weight * [sum_k CE(z_k) + sum_n CE(teacher_n)]
    + kd_weight * ramp(e) * sum_terms weight * T^2 * KL(teacher || student)
    + teacher_weight * sum_k T_t^2 * KL(p_ext || p_k)``.

    The aggregator is bound to the model (its layers sized from the model's metadata) and
    assigned to ``model.aggregator``, so ``model.parameters()`` trains it and ``export()`` drops
    it. Everything is computed in float32 with autocast disabled (logits are cast up), so bf16
    and fp16 autocast are safe. It compiles with ``torch.compile(fullgraph=True)``: the
    schedules are evaluated in Python when the epoch (or a schedule) is set and written into a
    small non-persistent buffer of the aggregator, which a compiled call reads as a tensor input:
    a ramp or MD weight that moves every step neither recompiles nor puts a CPU scalar into a
    CUDA graph.

    Args:
        model: the branched model (anything exposing ``num_leaves`` and an ``aggregator`` slot).
        aggregator: builds the teacher targets; ``None`` trains the leaves independently (CE
            only, plus the external teacher if given).
        temperature: T of every KD term (multiplied in as ``T^2``).
        ce_weight: multiplies every cross-entropy (leaves and aggregator teachers).
        kd_weight: multiplies the KD terms.
        ramp: schedule of the KD weight: ``None`` (constant 1), an int (sigmoid ramp over that
            many epochs), a float in (0, 1] (over that fraction of the run), or a
            :class:`~branchify.schedules.Schedule`. Drive it with :meth:`set_epoch` / :meth:`set_step`.
        detach: ``None`` keeps each aggregator's documented default; ``True``/``False``
            forces every KD term's teacher to be (not) detached.
        interval: an :class:`~branchify.schedules.IntervalSchedule` (MD): KD is off in the
            independent phase, and in the distillation phase CE is scaled by ``alpha`` and KD by
            ``beta`` (on top of ``ce_weight``, ``kd_weight`` and the ramp).
        teacher: an optional frozen pre-trained model (e.g. OKDDip+KD). It lives on this loss
            object - never in ``model.state_dict()``, never trained, never exported; it is put in
            eval mode with ``requires_grad=False`` and run under ``no_grad`` on ``inputs``.
        teacher_weight: weight of the external teacher's KD terms (not ramped).
        teacher_temperature: T for the external teacher (default: ``temperature``).

    Example:
        >>> okd = OnlineKD(model, Gate(), temperature=3.0, ramp=80 / 300)    # doctest: +SKIP
        >>> okd.set_epoch(epoch, epochs)                                       # doctest: +SKIP
        >>> loss = okd(model(x), y); loss.total.backward(); loss.parts["kd/leaf0"]  # doctest: +SKIP
    """

    def __init__(self, model: Any, aggregator: Aggregator | None = None, *, temperature: float = 3.0,
                 ce_weight: float = 1.0, kd_weight: float = 1.0, ramp: Schedule | int | float | None = None,
                 detach: bool | None = None, interval: IntervalSchedule | None = None,
                 teacher: nn.Module | None = None, teacher_weight: float = 1.0,
                 teacher_temperature: float | None = None) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if teacher_temperature is not None and not teacher_temperature > 0:
            raise ValueError(f"teacher_temperature must be > 0, got {teacher_temperature}")
        if detach not in (None, True, False):
            raise ValueError(f"detach must be None (aggregator default), True or False, got {detach!r}")
        if interval is not None and not isinstance(interval, IntervalSchedule):
            raise TypeError(f"interval must be an IntervalSchedule, got {type(interval).__name__}")
        self.temperature = float(temperature)
        self.ce_weight = float(ce_weight)
        self.kd_weight = float(kd_weight)
        self.ramp = as_schedule(ramp)
        self.detach = detach
        self.interval = interval
        self.teacher_weight = float(teacher_weight)
        self.teacher_temperature = float(teacher_temperature) if teacher_temperature is not None else self.temperature
        self.epoch: float | None = None
        self.total_epochs: int | None = None
        self.num_leaves: int | None = getattr(model, "num_leaves", None)
        self.aggregator = aggregator
        if aggregator is not None:
            self._attach(model, aggregator)
            self._refresh_schedule()
        self.teacher = teacher
        if teacher is not None:
            if teacher is model:
                raise ValueError("teacher is the branched model itself; pass a separate pre-trained model")
            teacher.eval()
            teacher.requires_grad_(False)

    # Schedules are evaluated in Python, outside a compiled graph: torch.compile would otherwise
    # trace their float arithmetic on ``epoch`` (guarding on its value - a recompile every epoch
    # - or failing on math.exp of a symbolic float). Assigning any of these refreshes the values
    # a compiled call reads; eager calls evaluate the schedules afresh every time.
    _SCHEDULE_INPUTS = frozenset({"epoch", "total_epochs", "ramp", "interval"})

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in self._SCHEDULE_INPUTS:
            self._refresh_schedule()

    def _refresh_schedule(self) -> None:
        """Evaluate the schedules and write (ramp, alpha, beta) into the aggregator's schedule
        buffer, in place: a compiled call reads that tensor (see :meth:`_schedule_buffer`)."""
        phase, ramp = self._evaluate_schedule()
        super().__setattr__("_schedule", (phase, ramp))
        buf = self._schedule_buffer()
        super().__setattr__("_schedule_ready", buf is not None and ramp is not None)
        super().__setattr__("_missing_epoch", getattr(self, "interval", None) is not None
                            and getattr(self, "epoch", None) is None)
        if buf is not None and ramp is not None:
            values = (ramp, *((phase.alpha, phase.beta) if phase is not None else (1.0, 1.0)))
            last = self.__dict__.get("_schedule_written")
            with torch.no_grad():
                # fill_ with a Python scalar is a kernel launch; copying from a CPU tensor would be a
                # pageable host-to-device copy, which waits for the GPU's queue every step.
                for i, v in enumerate(values):
                    if last is None or last[0] is not buf or last[1][i] != v:
                        buf[i].fill_(v)
            super().__setattr__("_schedule_written", (buf, values))

    def _schedule_buffer(self) -> torch.Tensor | None:
        """``[ramp, alpha, beta]`` as a non-persistent buffer of the aggregator (so it moves with
        ``model.to()``). A compiled step takes it as a tensor input: no Python float for dynamo
        to specialise on (one compile however the ramp moves) and no CPU scalar created inside
        a CUDA graph (which would make ``mode="reduce-overhead"`` skip CUDA graphs)."""
        return getattr(self.__dict__.get("aggregator"), "_okd_schedule", None)

    def _evaluate_schedule(self) -> tuple[Any, float | None]:
        """(interval phase or None, KD ramp weight or None while it cannot be evaluated)."""
        if not all(hasattr(self, n) for n in self._SCHEDULE_INPUTS):  # still in __init__
            return None, None
        phase = self.interval(self.epoch) if self.interval is not None and self.epoch is not None else None
        try:
            ramp = self.ramp_value()
        except (RuntimeError, ValueError):  # raised again, with its message, when the loss needs it
            ramp = None
        return phase, ramp

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _attach(model: Any, aggregator: Aggregator) -> None:
        if not isinstance(aggregator, Aggregator):
            raise TypeError(f"aggregator must be a branchify.aggregators.Aggregator, got {type(aggregator).__name__}")
        aggregator.bind(model)
        ref = _first_param(model)
        if ref is not None:
            aggregator.to(device=ref.device)
        # Assigning to the model's slot registers the aggregator as a submodule, so
        # model.parameters() (what users optimise) includes its parameters.
        model.aggregator = aggregator
        if "_okd_schedule" not in aggregator._buffers:
            aggregator.register_buffer("_okd_schedule", torch.ones(3, device=ref.device if ref is not None else None),
                                       persistent=False)

    # ------------------------------------------------------------------ progress
    def set_epoch(self, epoch: float, total_epochs: int | None = None) -> None:
        """Tell the loss the current epoch (from 0) and the run length (for relative ramps).

        Example:
            >>> okd.set_epoch(0, 300)    # doctest: +SKIP
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if total_epochs is not None:
            if total_epochs < 1:
                raise ValueError(f"total_epochs must be >= 1, got {total_epochs}")
            self.total_epochs = int(total_epochs)
        self.epoch = float(epoch)

    def set_step(self, step: int, steps_per_epoch: int, total_epochs: int | None = None) -> None:
        """Tell the loss the global optimisation step (from 0): epoch = ``step / steps_per_epoch``.

        Gives a ramp that moves every step instead of once per epoch.

        Example:
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

    # ------------------------------------------------------------------ the loss
    def _detach_of(self, term: KDTerm) -> bool:
        if self.detach is not None:
            return self.detach
        return True if term.detach is None else term.detach

    def term_loss(self, term: KDTerm, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``T^2 * KL(teacher || student)`` of one KD term with this loss's detach rule applied.

        Useful to inspect or test one term on its own (``weight``, ramp and ``kd_weight`` are not
        applied). ``mask`` marks the positions that count (see :func:`branchify.losses.valid_mask`).

        Example:
            >>> term = okd.targets(model(x)).kd[0]; okd.term_loss(term)     # doctest: +SKIP
        """
        detach = self._detach_of(term)
        teacher = term.teacher.detach() if detach else term.teacher
        if term.is_mixture:
            log_w = term.teacher_log_weights
            log_w = log_w.detach() if detach else log_w  # type: ignore[union-attr]
            return kl_div_mixture(teacher, log_w, term.student, self.temperature, mask)
        return kl_div_logits(teacher, term.student, self.temperature, mask)

    def targets(self, out: BranchedOutput) -> Targets:
        """Run the aggregator (in its parameters' dtype, autocast off); empty without one."""
        if self.aggregator is None:
            return Targets()
        return self.aggregator(_cast_output(out, self.aggregator.compute_dtype))

    def __call__(self, out: BranchedOutput, y: torch.Tensor, inputs: Any = None) -> LossOutput:
        """Compute the loss for one batch.

        Args:
            out: the branched model's output.
            y: integer labels, ``[B]`` or token-level ``[B, L]`` (``-100`` = ignore).
            inputs: the model inputs, needed only with an external ``teacher``: a tensor, a
                tuple (positional arguments) or a dict (keyword arguments).
        """
        if not isinstance(out, BranchedOutput):
            raise TypeError(f"okd(out, y) expects the BranchedOutput returned by the branched model, "
                            f"got {type(out).__name__}")
        if self.num_leaves is not None and out.num_leaves != self.num_leaves:
            raise ValueError(f"the output has {out.num_leaves} leaves but the model this loss was built "
                             f"for has {self.num_leaves}")
        device_type = out.logits[0].device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return self._loss(out, y, inputs)

    def _loss(self, out: BranchedOutput, y: torch.Tensor, inputs: Any) -> LossOutput:
        parts: dict[str, torch.Tensor] = {}
        mask = valid_mask(y, out.logits[0])
        if self._missing_epoch:  # a bool: reading the float epoch here would make dynamo guard on it
            raise RuntimeError(f"{self.interval!r} needs the epoch: call okd.set_epoch(epoch, total_epochs) "
                               f"at the start of every epoch")
        ramp_now: float | torch.Tensor | None
        alpha: float | torch.Tensor
        beta: float | torch.Tensor
        sched = self._schedule_buffer() if torch.compiler.is_compiling() and self._schedule_ready else None
        if sched is not None:
            # Tensors the graph reads: the Python floats are not touched here, since dynamo would
            # guard on their values (a recompile whenever the ramp moves).
            phase = self._schedule[0]
            ramp_now, alpha, beta = sched.float().unbind()
        else:
            phase, ramp_now = self._schedule if torch.compiler.is_compiling() else self._evaluate_schedule()
            alpha, beta = (phase.alpha, phase.beta) if phase is not None else (1.0, 1.0)

        ce_total = out.logits[0].new_zeros((), dtype=torch.float32)
        for k, z in enumerate(out.logits):
            ce = cross_entropy(z, y)
            parts[f"ce/leaf{k}"] = ce
            ce_total = ce_total + ce
        kd_on = self.aggregator is not None and (phase is None or phase.distill)
        targets = self.targets(out) if self.aggregator is not None else Targets()
        for name, z in targets.ce.items():
            ce = cross_entropy(z, y)
            parts[f"ce/{name}"] = ce
            ce_total = ce_total + ce
        total = self.ce_weight * alpha * ce_total
        parts["loss/ce"] = total

        ramp = (ramp_now if ramp_now is not None else self.ramp_value()) if kd_on else 0.0
        kd_total = out.logits[0].new_zeros((), dtype=torch.float32)
        if kd_on:
            for term in targets.kd:
                kl = self.term_loss(term, mask)
                parts[f"kd/{term.name}"] = kl
                kd_total = kd_total + term.weight * kl
        kd_total = self.kd_weight * beta * ramp * kd_total
        parts["loss/kd"] = kd_total
        parts["ramp"] = _scalar(ramp, kd_total)
        if phase is not None:
            parts["alpha"], parts["beta"] = _scalar(alpha, kd_total), _scalar(beta, kd_total)
        total = total + kd_total

        if self.teacher is not None:
            ext_total = self._external(out, inputs, mask, parts)
            parts["loss/ext"] = ext_total
            total = total + ext_total
        return LossOutput(total=total, parts={k: v.detach() for k, v in parts.items()})

    def _external(self, out: BranchedOutput, inputs: Any, mask: torch.Tensor | None,
                  parts: dict[str, torch.Tensor]) -> torch.Tensor:
        if inputs is None:
            raise ValueError("this OnlineKD has an external teacher, which needs the model inputs: call "
                             "okd(out, y, inputs=x) with the same inputs you gave the model")
        teacher = self.teacher
        assert teacher is not None
        if teacher.training:  # a user's .train() elsewhere must not leak into the frozen teacher
            teacher.eval()
        ref = _first_param(teacher)
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

    def __repr__(self) -> str:
        agg = type(self.aggregator).__name__ if self.aggregator is not None else None
        return (f"OnlineKD(aggregator={agg}, temperature={self.temperature}, ce_weight={self.ce_weight}, "
                f"kd_weight={self.kd_weight}, ramp={self.ramp!r}, detach={self.detach}, "
                f"interval={self.interval!r}, teacher={'yes' if self.teacher is not None else None})")
