"""Schedules that drive online-KD losses over training: ramps and MD's interval schedule."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import BranchifyError


class ScheduleError(BranchifyError, ValueError):
    """A schedule was configured or queried inconsistently (names the argument to fix)."""


class Schedule:
    """A weight as a function of training progress: ``schedule(epoch, total_epochs) -> float``.

    ``epoch`` counts from 0 and may be fractional (``OnlineKD.set_step``); ``total_epochs``
    is the run length, needed only by schedules defined relative to the run.
    """

    def __call__(self, epoch: float, total_epochs: int | None = None) -> float:  # pragma: no cover
        raise NotImplementedError


class Constant(Schedule):
    """A constant weight (no ramp).

    Examples:
        >>> Constant(0.5)(epoch=10)
        0.5
    """

    def __init__(self, value: float = 1.0) -> None:
        self.value = float(value)

    def __call__(self, epoch: float, total_epochs: int | None = None) -> float:
        return self.value

    def __repr__(self) -> str:
        return f"Constant({self.value})"


def sigmoid_rampup(epoch: float, length: float) -> float:
    """``exp(-5 (1 - e/L)^2)`` for ``e < L``, else 1 (Laine & Aila's ramp, as in ONE/OKDDip/AHBF).

    Examples:
        >>> round(sigmoid_rampup(0, 80), 4), sigmoid_rampup(80, 80)
        (0.0067, 1.0)
    """
    if length <= 0 or epoch >= length:
        return 1.0
    phase = 1.0 - max(float(epoch), 0.0) / length
    return math.exp(-5.0 * phase * phase)


class SigmoidRampUp(Schedule):
    """Sigmoid ramp-up ``w(e) = exp(-5 (1 - e/L)^2)`` for ``e < L``, else 1; ``e`` from 0.

    Give the length either in epochs (``epochs=80``) or as a fraction of the run
    (``fraction=80/300``: ONE and OKDDip's 80 of 300 epochs scaled to any run length;
    ``fraction=1.0``: AHBF's ramp over the whole run). A fractional length needs
    ``total_epochs`` when queried.

    Examples:
        >>> ramp = SigmoidRampUp(fraction=80 / 300)
        >>> round(ramp(0, total_epochs=300), 4), ramp(80, total_epochs=300)
        (0.0067, 1.0)
        >>> round(SigmoidRampUp(epochs=80)(40), 4)
        0.2865
    """

    def __init__(self, epochs: float | None = None, *, fraction: float | None = None) -> None:
        if (epochs is None) == (fraction is None):
            raise ScheduleError("SigmoidRampUp needs exactly one of epochs=<ramp length in epochs> or "
                                "fraction=<ramp length as a fraction of the run>")
        if epochs is not None and not epochs > 0:
            raise ScheduleError(f"SigmoidRampUp(epochs={epochs}) must be > 0")
        if fraction is not None and not 0 < fraction <= 1:
            raise ScheduleError(f"SigmoidRampUp(fraction={fraction}) must be in (0, 1]")
        self.epochs = None if epochs is None else float(epochs)
        self.fraction = None if fraction is None else float(fraction)

    def length(self, total_epochs: int | None = None) -> float:
        """The ramp length L in epochs."""
        if self.epochs is not None:
            return self.epochs
        if total_epochs is None:
            raise ScheduleError(f"{self!r} is a fraction of the run and needs the run length: call "
                                f"okd.set_epoch(epoch, total_epochs) (or give the ramp in epochs)")
        return self.fraction * float(total_epochs)  # type: ignore[operator]

    def __call__(self, epoch: float, total_epochs: int | None = None) -> float:
        return sigmoid_rampup(epoch, self.length(total_epochs))

    def __repr__(self) -> str:
        return (f"SigmoidRampUp(epochs={self.epochs:g})" if self.epochs is not None
                else f"SigmoidRampUp(fraction={self.fraction:g})")


def as_schedule(ramp: "Schedule | int | float | None") -> Schedule:
    """Normalise a ``ramp=`` argument.

    ``None`` -> no ramp (constant 1); an ``int`` -> sigmoid ramp over that many epochs; a
    ``float`` in (0, 1] -> sigmoid ramp over that fraction of the run; a :class:`Schedule`
    is used as is.

    Examples:
        >>> as_schedule(80), as_schedule(0.25), as_schedule(None)
        (SigmoidRampUp(epochs=80), SigmoidRampUp(fraction=0.25), Constant(1.0))
    """
    if ramp is None:
        return Constant(1.0)
    if isinstance(ramp, Schedule):
        return ramp
    if isinstance(ramp, bool):
        raise ScheduleError(f"ramp={ramp!r}: pass None, an int (epochs), a float in (0, 1] (fraction of "
                            f"the run) or a Schedule")
    if isinstance(ramp, int):
        return SigmoidRampUp(epochs=ramp)
    if isinstance(ramp, float):
        if not 0 < ramp <= 1:
            raise ScheduleError(f"ramp={ramp!r} is a float, i.e. a fraction of the run, and must be in "
                                f"(0, 1]; for a length in epochs pass an int (ramp={int(ramp)})")
        return SigmoidRampUp(fraction=ramp)
    raise ScheduleError(f"ramp={ramp!r}: pass None, an int (epochs), a float in (0, 1] or a Schedule")


@dataclass(frozen=True)
class IntervalPhase:
    """Where an epoch falls in MD's interval schedule.

    Attributes:
        phase: ``"independent"`` (CE only) or ``"distill"``.
        cycle: 0-based cycle index.
        r: distillation epoch within the cycle (0-based); ``None`` in the independent phase.
        alpha: CE weight (1 in the independent phase).
        beta: KD weight (0 in the independent phase).
    """

    phase: str
    cycle: int
    r: int | None
    alpha: float
    beta: float

    @property
    def distill(self) -> bool:
        return self.phase == "distill"


class IntervalSchedule:
    """MD's "discontinuous distillation with progressively enhanced constraints".

    Cycles of ``independent`` epochs (CE only) then ``distill`` epochs, repeated until the run
    ends. In distillation epoch ``r`` (0-based within the cycle) the loss is
    ``alpha * CE + beta * KL`` with ``alpha = 1 - r/T_d`` and ``beta = 1 + r/T_d`` (gradual);
    ``gradual=False`` gives the fixed-weight ablation ``alpha = 1, beta = 2``.

    A last cycle cut short by the epoch budget simply stops: its epochs keep the values they
    would have in a full cycle (``r`` counts from 0, the weights follow ``1 -/+ r/T_d``), so it
    never reaches the late-cycle weights. Nothing is rescaled to fit the remaining epochs.
    Fractional epochs (from ``set_step``) use the epoch they fall in.

    Args:
        independent: ``T_in``, epochs of independent training per cycle (>= 0).
        distill: ``T_d``, distillation epochs per cycle (>= 1).
        gradual: gradual weights (default) or the fixed ``alpha=1, beta=2`` ablation.

    Examples:
        >>> s = IntervalSchedule(independent=10, distill=30)
        >>> s(5).phase, s(10).alpha, s(25).beta, s(40).phase
        ('independent', 1.0, 1.5, 'independent')
    """

    def __init__(self, independent: int = 10, distill: int = 30, *, gradual: bool = True) -> None:
        if isinstance(independent, bool) or not isinstance(independent, int) or independent < 0:
            raise ScheduleError(f"IntervalSchedule(independent={independent!r}) must be an int >= 0")
        if isinstance(distill, bool) or not isinstance(distill, int) or distill < 1:
            raise ScheduleError(f"IntervalSchedule(distill={distill!r}) must be an int >= 1")
        self.independent = independent
        self.distill = distill
        self.gradual = bool(gradual)

    @property
    def cycle_length(self) -> int:
        return self.independent + self.distill

    def __call__(self, epoch: float, total_epochs: int | None = None) -> IntervalPhase:
        e = int(math.floor(max(float(epoch), 0.0)))
        cycle, within = divmod(e, self.cycle_length)
        if within < self.independent:
            return IntervalPhase("independent", cycle, None, 1.0, 0.0)
        r = within - self.independent
        if not self.gradual:
            return IntervalPhase("distill", cycle, r, 1.0, 2.0)
        return IntervalPhase("distill", cycle, r, 1.0 - r / self.distill, 1.0 + r / self.distill)

    def __repr__(self) -> str:
        return f"IntervalSchedule(independent={self.independent}, distill={self.distill}, gradual={self.gradual})"
