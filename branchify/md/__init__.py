"""MD (Gao et al. 2019): cross-architecture online distillation by interval distillation against
fixed, accuracy-weighted soft labels - in one process or across ranks.

Protocol (formulas and sources: docs/methods/md.md), repeated until the epoch budget ends:

1. ``T_in`` epochs of independent training: each peer minimises CE alone.
2. At the first distillation epoch of the cycle every peer computes soft labels
   ``S_i = softmax(z / t)`` on the **whole training set** in eval mode, without augmentation;
   they are combined as ``S_e = sum_i a_i S_i`` with ``a_i = v_i / sum_k v_k`` and ``v_i`` the
   peer's accuracy on the validation loader when one is given, else its training accuracy
   (from that same eval pass).
3. ``T_d`` epochs of distillation against the *fixed* ``S_e``:
   ``L_i = alpha * CE + beta * KL(S_e || softmax(z_i / t))`` with ``alpha = 1 - r/T_d``,
   ``beta = 1 + r/T_d`` (``r`` = 0-based distillation epoch of the cycle), or ``alpha = 1,
   beta = 2`` for the fixed-weight ablation (``IntervalSchedule(gradual=False)``). As in the
   paper's Eq. 9 the KL is *not* multiplied by ``t^2`` (unlike the other methods, whose authors'
   code does so); ``kd_t2=True`` adds it. Measured on the CPU MD benchmark: with ``t^2`` at
   ``t = 3`` MD falls 11-12 points below independent training, without it about one.

Any epoch budget works. A last cycle cut short simply stops: its epochs keep exactly the
values they have in a full cycle (no rescaling of ``r`` or the weights), so a budget ending
inside a distillation phase never reaches the late-cycle weights, and one ending inside an
independent phase finishes with CE-only epochs (their soft labels are never computed). The
paper trains "until all students converge" - choose ``epochs = k * (T_in + T_d)`` to end on a
full cycle.

Soft labels are read per batch by **training-sample index**: the training loader yields
``(inputs, labels, indices)`` (``recipes.data.TensorLoader(..., with_index=True)`` or
``DataLoader(branchify.utils.IndexedDataset(dataset))``), and the soft-label loader is a second
loader over the same training set without augmentation.

Everything MD-specific lives in this package: the loop (``trainer.py``), the loss (``loss.py``),
the per-peer RNG streams (``rng.py``), the soft labels (``soft_labels.py``) and their
combination over peers and ranks (``exchange.py``). It builds on shared pieces: the peers are a
:class:`~branchify.Cohort`, the interval schedule is :class:`~branchify.schedules.IntervalSchedule`
(re-exported here), the weight rule is
:func:`~branchify.aggregators.accuracy_weighted.accuracy_weights` (also the ``AccuracyWeighted``
aggregator's), and the collectives are :mod:`branchify.distributed`'s.

Examples:
    >>> cohort = Cohort([resnet20(10, 1), mobilenetv2(10, 1)])                      # doctest: +SKIP
    >>> opts = [torch.optim.SGD(cohort.peer_parameters(i), lr=0.05) for i in range(2)]  # doctest: +SKIP
    >>> trainer = MDTrainer(cohort, opts, train_loader, soft_label_loader=plain_loader,   # doctest: +SKIP
    ...                     schedule=IntervalSchedule(independent=10, distill=30))
    >>> history = trainer.fit(epochs=80)                                                 # doctest: +SKIP
"""
from ..schedules import IntervalPhase, IntervalSchedule
from .exchange import Aggregate, CollectiveExchange, LocalExchange
from .loss import MDError, md_loss
from .soft_labels import SoftLabelError, SoftLabelPass, compute_soft_labels
from .trainer import CHECKPOINT_FORMAT, MDTrainer

__all__ = ["Aggregate", "CHECKPOINT_FORMAT", "CollectiveExchange", "IntervalPhase", "IntervalSchedule", "LocalExchange",
           "MDError", "MDTrainer", "SoftLabelError", "SoftLabelPass", "compute_soft_labels", "md_loss"]
