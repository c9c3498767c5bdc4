"""The MD training loop, :class:`MDTrainer`: per-peer optimisers, the interval schedule, soft labels
computed on the whole training set and combined across peers (in one process or across ranks),
evaluation, and atomic per-rank checkpoints that resume a run exactly."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ..cohort import Cohort, call_peer, peer_logits
from ..schedules import IntervalPhase, IntervalSchedule
from ..utils import autocast, model_device, sequence_checksum, split_batch, to_device
from .exchange import LocalExchange
from .loss import MDError, md_loss
from .rng import _PeerRNG
from .soft_labels import SoftLabelError, compute_soft_labels, indexed_batch

CHECKPOINT_FORMAT = "branchify.md/1"


class MDTrainer:
    """Trains a cohort's peers with MD's protocol (or independently, as the baseline).

    Every peer has its own optimiser (and optionally LR scheduler); per batch each peer does its
    own forward/backward/step on the same batch. In a distributed run each rank builds a
    :class:`MDTrainer` for the peers it hosts with ``peer_ids`` (their global indices) and
    ``exchange=CollectiveExchange(...)``; the soft labels are then combined by an all_reduce
    and every rank holds the same ``S_e``.

    Checkpoints (``checkpoint_dir``): one file per rank, ``md-rank{r}.pt``, written atomically
    after every ``checkpoint_every`` epochs with the next epoch, every local peer's model /
    optimiser / LR-scheduler / RNG state, and the current cycle's ``S_e`` with its weights.
    :meth:`fit` resumes from it: mid-distillation it reuses the stored ``S_e`` (recomputing from
    the partly distilled peers would change the teacher), at a cycle's first distillation epoch
    it computes them as an uninterrupted run would. For an identical continuation the training
    loader must make epoch ``e``'s batches depend only on ``e`` (``set_epoch(e)`` is called when
    the loader has it, as ``TensorLoader`` and ``DistributedSampler`` do).

    Args:
        cohort: the peers hosted by this process.
        optimizers: one per local peer, over that peer's parameters
            (``cohort.peer_parameters(i)``).
        train_loader: yields ``(inputs, labels, indices)``; the same batches on every rank.
        soft_label_loader: the whole training set, no augmentation, yielding indices too
            (required unless ``schedule`` is ``None``).
        schedule: ``IntervalSchedule(T_in, T_d, gradual=...)``; ``None`` trains independently
            (CE only) - the baseline.
        temperature: ``t`` of the soft labels and the KL (paper: 3).
        val_loader: if given, ``v_i`` is the accuracy on it; else the training accuracy.
        lr_schedulers: one per local peer (or ``None``), stepped per ``lr_step``.
        lr_step: ``"epoch"`` or ``"step"``.
        peer_ids: global indices of the local peers (default ``0..len(cohort)-1``).
        exchange: :class:`~branchify.md.LocalExchange` (default) or
            :class:`~branchify.md.CollectiveExchange`.
        num_samples: training-set size (default: ``soft_label_loader.num_samples`` or
            ``len(soft_label_loader.dataset)``).
        seed: seeds the per-peer RNG streams (peer ``i`` uses ``seed * 1000 + i``).
        check_order: in a distributed run, compare a checksum of each epoch's sample order (and
            labels) across ranks and fail if they differ.
        kd_t2: see :func:`md_loss`.
        amp_dtype: autocast dtype for the peers' forward (``None`` = full precision).
        checkpoint_dir / checkpoint_every: where and how often to checkpoint.

    Examples:
        >>> cohort = Cohort([resnet20(10, 1), mobilenetv2(10, 1)])                      # doctest: +SKIP
        >>> opts = [torch.optim.SGD(cohort.peer_parameters(i), lr=0.05) for i in range(2)]  # doctest: +SKIP
        >>> md = MDTrainer(cohort, opts, TensorLoader(x, y, 64, ..., with_index=True),      # doctest: +SKIP
        ...                soft_label_loader=TensorLoader(x, y, 256, ..., with_index=True),
        ...                schedule=IntervalSchedule(10, 30), checkpoint_dir="runs/md-ckpt")
        >>> md.fit(80); md.cycles[0]["weights"]                                          # doctest: +SKIP
        [0.52, 0.48]
    """

    def __init__(self, cohort: Cohort, optimizers: Sequence[torch.optim.Optimizer], train_loader: Iterable, *,
                 soft_label_loader: Iterable | None = None, schedule: IntervalSchedule | None = None,
                 temperature: float = 3.0, val_loader: Iterable | None = None,
                 lr_schedulers: Sequence[Any] | None = None, lr_step: str = "epoch",
                 peer_ids: Sequence[int] | None = None, exchange: LocalExchange | None = None,
                 num_samples: int | None = None, seed: int = 0, check_order: bool = True, kd_t2: bool = False,
                 amp_dtype: torch.dtype | None = None, checkpoint_dir: str | Path | None = None,
                 checkpoint_every: int = 1) -> None:
        if not isinstance(cohort, Cohort):
            raise MDError(f"MDTrainer trains a branchify.Cohort, got {type(cohort).__name__}; wrap the networks "
                          f"this process hosts: Cohort([net, ...])")
        if schedule is not None and not isinstance(schedule, IntervalSchedule):
            raise MDError(f"schedule must be an IntervalSchedule or None (baseline), got {type(schedule).__name__}")
        if not temperature > 0:
            raise MDError(f"temperature must be > 0, got {temperature}")
        if lr_step not in ("epoch", "step"):
            raise MDError(f"lr_step={lr_step!r}: choose 'epoch' or 'step'")
        self.cohort = cohort
        self.peers = list(cohort.peers)
        self.optimizers = list(optimizers)
        self._check_optimizers()
        self.lr_schedulers = list(lr_schedulers) if lr_schedulers is not None else [None] * len(self.peers)
        if len(self.lr_schedulers) != len(self.peers):
            raise MDError(f"got {len(self.lr_schedulers)} LR schedulers for {len(self.peers)} peers (use None "
                          f"entries for peers without one)")
        self.train_loader = train_loader
        self.soft_label_loader = soft_label_loader
        self.val_loader = val_loader
        self.schedule = schedule
        self.temperature = float(temperature)
        self.lr_step = lr_step
        self.peer_ids = list(peer_ids) if peer_ids is not None else list(range(len(self.peers)))
        if len(self.peer_ids) != len(self.peers) or len(set(self.peer_ids)) != len(self.peer_ids):
            raise MDError(f"peer_ids={self.peer_ids} must give one distinct global index per local peer "
                          f"({len(self.peers)})")
        self.exchange = exchange if exchange is not None else LocalExchange()
        self.check_order = bool(check_order)
        self.kd_t2 = bool(kd_t2)
        self.amp_dtype = amp_dtype
        self.seed = int(seed)
        if schedule is not None and soft_label_loader is None:
            raise MDError("MD needs soft_label_loader: a loader over the whole training set, without augmentation, "
                          "yielding (inputs, labels, indices) - e.g. TensorLoader(x, y, ..., with_index=True)")
        self.num_samples = self._num_samples(num_samples) if schedule is not None else num_samples
        self.devices = [model_device(p) for p in self.peers]
        self._rng = [_PeerRNG(self.seed * 1000 + pid, d) for pid, d in zip(self.peer_ids, self.devices)]
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every = int(checkpoint_every)
        self.epoch = 0
        self.teacher: torch.Tensor | None = None
        self.teacher_cycle: int | None = None
        self.weights: list[float] | None = None
        self.accuracies: list[float] | None = None
        self.history: list[dict[str, Any]] = []
        self.cycles: list[dict[str, Any]] = []
        self.soft_label_passes = 0
        self.resumed_from: int | None = None

    # ------------------------------------------------------------------ setup checks
    def _check_optimizers(self) -> None:
        if len(self.optimizers) != len(self.peers):
            raise MDError(f"got {len(self.optimizers)} optimizers for {len(self.peers)} local peers; build one per "
                          f"peer over cohort.peer_parameters(i)")
        for i, (opt, peer) in enumerate(zip(self.optimizers, self.peers)):
            own = {id(p) for p in peer.parameters()}
            foreign = sum(1 for g in opt.param_groups for p in g["params"] if id(p) not in own)
            if foreign:
                raise MDError(f"optimizer {i} holds {foreign} parameters that are not peer {i}'s "
                              f"({self.cohort.names[i]}); build it over cohort.peer_parameters({i})")

    def _num_samples(self, given: int | None) -> int:
        if given is not None:
            return int(given)
        loader = self.soft_label_loader
        n = getattr(loader, "num_samples", None)
        if n is None and hasattr(loader, "dataset"):
            n = len(loader.dataset)  # type: ignore[union-attr]
        if n is None:
            raise MDError("cannot tell the training-set size from soft_label_loader; pass num_samples=<N>")
        return int(n)

    # ------------------------------------------------------------------ soft labels
    def phase(self, epoch: int) -> IntervalPhase | None:
        """Where ``epoch`` falls in the schedule (``None`` for the independent baseline)."""
        return self.schedule(epoch) if self.schedule is not None else None

    def refresh_soft_labels(self, cycle: int) -> None:
        """Compute every local peer's soft labels and combine them over all peers into ``S_e``."""
        passes, accs = [], []
        for peer, rng in zip(self.peers, self._rng):
            with rng.active():
                sl = compute_soft_labels(peer, self.soft_label_loader, self.num_samples,  # type: ignore[arg-type]
                                         self.temperature, amp_dtype=self.amp_dtype)
            passes.append(sl)
            accs.append(self.accuracy(peer, self.val_loader) if self.val_loader is not None else sl.accuracy)
        checksum = passes[0].labels_checksum()
        for j, sl in enumerate(passes[1:], 1):
            if sl.labels_checksum() != checksum:
                raise SoftLabelError(f"local peers {self.peer_ids[0]} and {self.peer_ids[j]} saw different labels in "
                                     f"the soft-label pass; the soft-label loader must be deterministic")
        agg = self.exchange.combine(self.peer_ids, [sl.probs for sl in passes], accs, checksum)
        self.teacher = agg.soft_labels.to(self.devices[0])
        self.teacher_cycle = cycle
        self.weights, self.accuracies = agg.weights, agg.accuracies
        self.soft_label_passes += 1
        self.cycles.append({"cycle": cycle, "epoch": self.epoch, "accuracies": agg.accuracies,
                            "weights": agg.weights, "source": "validation" if self.val_loader is not None else "train"})

    # ------------------------------------------------------------------ training
    def fit(self, epochs: int, *, resume: bool = True, eval_loader: Iterable | None = None, eval_every: int = 0,
            callback: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """Train up to ``epochs`` (total, counting epochs done before a resume).

        Args:
            epochs: the run's epoch budget.
            resume: load ``checkpoint_dir``'s file for this rank if it exists.
            eval_loader: evaluated every ``eval_every`` epochs and after the last (if given).
            callback: called with each epoch's record after its checkpoint is written.

        Returns:
            The history: one record per epoch (phase, ``r``, ``alpha``, ``beta``, mean loss per peer,
            seconds, and accuracies when evaluated).

        Examples:
            >>> history = trainer.fit(40, eval_loader=test_loader, eval_every=10)     # doctest: +SKIP
            >>> history[12]["phase"], history[12]["r"], history[12]["alpha"]         # doctest: +SKIP
            ('distill', 2, 0.9333333333333333)
        """
        if resume and self.checkpoint_dir is not None and self.checkpoint_path.is_file():
            self.load_checkpoint(self.checkpoint_path)
            self.resumed_from = self.epoch
        self.exchange.check_same(self.epoch, "epoch to start from",
                                 "resume every rank from checkpoints written at the same epoch (or none)")
        for peer in self.peers:
            peer.train()
        while self.epoch < epochs:
            record = self._train_epoch(self.epoch)
            if eval_loader is not None and ((eval_every and (self.epoch + 1) % eval_every == 0)
                                            or self.epoch + 1 == epochs):
                record["accuracy"] = self.evaluate(eval_loader)
            self.epoch += 1
            self.history.append(record)
            if self.checkpoint_dir is not None and (self.epoch % self.checkpoint_every == 0 or self.epoch == epochs):
                self.save_checkpoint(self.checkpoint_path)
            if callback is not None:
                callback(record)
        return self.history

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        phase = self.phase(epoch)
        if phase is not None and phase.distill and self.teacher_cycle != phase.cycle:
            self.refresh_soft_labels(phase.cycle)
        if hasattr(self.train_loader, "set_epoch"):
            self.train_loader.set_epoch(epoch)  # type: ignore[union-attr]
        order = None
        sums = [torch.zeros((), device=d) for d in self.devices]
        steps = 0
        for batch in self.train_loader:
            args, kwargs, y, index = indexed_batch(batch, need_index=phase is not None and phase.distill)
            if index is not None:
                h = sequence_checksum(index, y)
                order = h if order is None else order * 1_000_003 + h
            teacher = self.teacher[index.to(self.teacher.device)] if (
                phase is not None and phase.distill and self.teacher is not None) else None
            for j, peer in enumerate(self.peers):
                sums[j] += self._step(j, peer, args, kwargs, y, teacher, phase)
            steps += 1
        if steps == 0:
            raise MDError("the training loader yielded no batches")
        for sched in self.lr_schedulers:
            if sched is not None and self.lr_step == "epoch":
                sched.step()
        if self.check_order and self.exchange.world_size > 1:
            self.exchange.check_same(int(order) if order is not None else None, f"training samples of epoch {epoch} "
                                     f"(checksum of indices and labels in order)",
                                     "every rank must draw the same batches: same data, seed and batch size; do not "
                                     "shard with a DistributedSampler")
        return {"epoch": epoch, "phase": phase.phase if phase else "independent", "cycle": phase.cycle if phase else 0,
                "r": phase.r if phase else None, "alpha": phase.alpha if phase else 1.0,
                "beta": phase.beta if phase else 0.0, "peers": list(self.peer_ids),
                "loss": [float(s) / steps for s in sums], "seconds": time.perf_counter() - t0}

    def _step(self, j: int, peer: nn.Module, args: tuple, kwargs: dict, y: torch.Tensor,
              teacher: torch.Tensor | None, phase: IntervalPhase | None) -> torch.Tensor:
        device = self.devices[j]
        a, kw = to_device(args, kwargs, device)
        with self._rng[j].active():
            with autocast(device, self.amp_dtype):
                z = peer_logits(call_peer(peer, a, kw))
            t = teacher.to(device) if teacher is not None else None
            loss = md_loss(z.float(), y.to(device), t, phase, self.temperature, kd_t2=self.kd_t2)
            opt = self.optimizers[j]
            opt.zero_grad(set_to_none=True)
            loss.total.backward()
            opt.step()
        sched = self.lr_schedulers[j]
        if sched is not None and self.lr_step == "step":
            sched.step()
        return loss.total.detach()

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def predict(self, loader: Iterable) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Each local peer's softmax probabilities over ``loader`` (eval mode) and the labels, on CPU."""
        probs: list[list[torch.Tensor]] = [[] for _ in self.peers]
        labels = []
        for batch in loader:
            args, kwargs, y, _ = split_batch(batch)
            for j, peer in enumerate(self.peers):
                was = peer.training
                peer.eval()
                a, kw = to_device(args, kwargs, self.devices[j])
                probs[j].append(peer_logits(call_peer(peer, a, kw)).float().softmax(-1).cpu())
                peer.train(was)
            labels.append(y.cpu())
        return [torch.cat(p) for p in probs], torch.cat(labels)

    def accuracy(self, peer: nn.Module, loader: Iterable) -> float:
        """Top-1 accuracy (%) of one peer on ``loader`` (eval mode)."""
        j = next(i for i, p in enumerate(self.peers) if p is peer)
        correct, n = 0, 0
        was = peer.training
        peer.eval()
        with torch.no_grad():
            for batch in loader:
                args, kwargs, y, _ = split_batch(batch)
                a, kw = to_device(args, kwargs, self.devices[j])
                z = peer_logits(call_peer(peer, a, kw))
                correct += int((z.argmax(-1).cpu() == y.cpu()).sum())
                n += len(y)
        peer.train(was)
        return 100.0 * correct / max(n, 1)

    def evaluate(self, loader: Iterable) -> list[float]:
        """Top-1 accuracy (%) of every local peer on ``loader``."""
        return [self.accuracy(p, loader) for p in self.peers]

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path:
        """This rank's checkpoint file."""
        if self.checkpoint_dir is None:
            raise MDError("no checkpoint_dir was given")
        return self.checkpoint_dir / f"md-rank{self.exchange.rank}.pt"

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run exactly (see the class docstring)."""
        sched = self.schedule
        return {
            "format": CHECKPOINT_FORMAT, "epoch": self.epoch, "peer_ids": self.peer_ids,
            "names": list(self.cohort.names), "num_samples": self.num_samples, "temperature": self.temperature,
            "schedule": None if sched is None else [sched.independent, sched.distill, sched.gradual],
            "peers": [p.state_dict() for p in self.peers],
            "optimizers": [o.state_dict() for o in self.optimizers],
            "lr_schedulers": [s.state_dict() if s is not None else None for s in self.lr_schedulers],
            "rng": [r.state_dict() for r in self._rng],
            "teacher": self.teacher.cpu() if self.teacher is not None else None,
            "teacher_cycle": self.teacher_cycle, "weights": self.weights, "accuracies": self.accuracies,
            "history": self.history, "cycles": self.cycles,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the run's configuration must match the checkpoint's."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise MDError(f"not an MD checkpoint (format {state.get('format')!r}, expected {CHECKPOINT_FORMAT!r})")
        sched = self.schedule
        mine = None if sched is None else [sched.independent, sched.distill, sched.gradual]
        for key, current in (("peer_ids", self.peer_ids), ("schedule", mine), ("num_samples", self.num_samples),
                             ("temperature", self.temperature)):
            if state[key] != current:
                raise MDError(f"the checkpoint was written with {key}={state[key]!r} but this run has {current!r}; "
                              f"resume with the same configuration or start in a fresh checkpoint_dir")
        for peer, sd in zip(self.peers, state["peers"]):
            peer.load_state_dict(sd)
        for opt, sd in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(sd)
        for sched_j, sd in zip(self.lr_schedulers, state["lr_schedulers"]):
            if sched_j is not None and sd is not None:
                sched_j.load_state_dict(sd)
        for rng, sd in zip(self._rng, state["rng"]):
            rng.load_state_dict(sd)
        self.epoch = int(state["epoch"])
        self.teacher = state["teacher"].to(self.devices[0]) if state["teacher"] is not None else None
        self.teacher_cycle = state["teacher_cycle"]
        self.weights, self.accuracies = state["weights"], state["accuracies"]
        self.history, self.cycles = list(state["history"]), list(state["cycles"])

    def save_checkpoint(self, path: str | Path) -> None:
        """Write :meth:`state_dict` atomically (a crash mid-write leaves the previous file intact)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, path: str | Path) -> None:
        """Load a checkpoint written by :meth:`save_checkpoint`."""
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
