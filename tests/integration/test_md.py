"""MD protocol: schedule and weights against the paper's formulas (written out here), fixed
accuracy-weighted soft labels from an eval-mode pass, the cut-short last cycle, resume from a
checkpoint mid-cycle, and the errors for bad loaders / optimisers / checkpoints."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import branchify as bf
from branchify.md import MDError, MDTrainer, md_loss
from branchify.schedules import IntervalSchedule
from branchify.aggregators import AccuracyWeighted, AggregatorError
from branchify.aggregators.accuracy_weighted import accuracy_weights
from branchify.md.soft_labels import SoftLabelError, compute_soft_labels
from branchify.utils import IndexedDataset, split_batch
from branchify.recipes.data import TensorLoader

from peer_models import SmallCNN, SmallMLP

N, BATCH, T = 48, 16, 3.0


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def make_data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (N, 1, 8, 8), generator=g, dtype=torch.uint8)
    labels = (images.float().mean(dim=(1, 2, 3)) > 127).long() + 2 * (images[:, 0, 0, :4].float().mean(1) > 127).long()
    return images, labels


def loaders(seed: int = 0, augment: bool = True):
    images, labels = make_data()
    train = TensorLoader(images, labels, BATCH, mean=(0.5,), std=(0.25,), shuffle=True, seed=seed,
                         augment=augment, crop_padding=1, with_index=True)
    plain = TensorLoader(images, labels, 20, mean=(0.5,), std=(0.25,), with_index=True)
    return train, plain


def make_trainer(schedule=IntervalSchedule(2, 3), *, checkpoint_dir=None, val_loader=None, seed=0):
    torch.manual_seed(0)
    cohort = bf.Cohort([SmallCNN(), SmallMLP()])
    opts = [torch.optim.SGD(cohort.peer_parameters(i), lr=0.1, momentum=0.9) for i in range(2)]
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5) for o in opts]
    train, plain = loaders(seed)
    return MDTrainer(cohort, opts, train, soft_label_loader=plain if schedule is not None else None,
                     schedule=schedule, temperature=T, lr_schedulers=scheds, checkpoint_dir=checkpoint_dir,
                     val_loader=val_loader)


# ---------------------------------------------------------------------- formulas
def test_schedule_and_weights_follow_the_paper():
    t_in, t_d = 2, 4
    sched = IntervalSchedule(t_in, t_d)
    fixed = IntervalSchedule(t_in, t_d, gradual=False)
    for e in range(3 * (t_in + t_d) + 1):
        within = e % (t_in + t_d)
        ph, fx = sched(e), fixed(e)
        if within < t_in:
            assert (ph.phase, ph.r, fx.phase) == ("independent", None, "independent")
        else:
            r = within - t_in
            assert (ph.phase, ph.r, ph.cycle) == ("distill", r, e // (t_in + t_d))
            assert math.isclose(ph.alpha, 1 - r / t_d) and math.isclose(ph.beta, 1 + r / t_d)
            assert (fx.alpha, fx.beta) == (1.0, 2.0)


def test_md_loss_matches_hand_written_formula():
    g = torch.Generator().manual_seed(1)
    z, y = torch.randn(5, 4, generator=g), torch.tensor([0, 1, 2, 3, 1])
    s_e = torch.softmax(torch.randn(5, 4, generator=g), -1)
    ce = -torch.log_softmax(z, -1)[torch.arange(5), y].mean()
    kl = (s_e * (s_e.log() - torch.log_softmax(z / T, -1))).sum(-1).mean()
    for e, (alpha, beta) in [(2, (1.0, 1.0)), (3, (0.75, 1.25)), (5, (0.25, 1.75))]:
        phase = IntervalSchedule(2, 4)(e)
        out = md_loss(z, y, s_e, phase, T)  # the default: Eq. 9, no t^2
        assert torch.allclose(out.total, alpha * ce + beta * kl, atol=1e-6)
        scaled = md_loss(z, y, s_e, phase, T, kd_t2=True)
        assert torch.allclose(scaled.total, alpha * ce + beta * T * T * kl, atol=1e-6)
    fixed = md_loss(z, y, s_e, IntervalSchedule(2, 4, gradual=False)(5), T)
    assert torch.allclose(fixed.total, ce + 2 * kl, atol=1e-6)
    indep = md_loss(z, y, None, IntervalSchedule(2, 4)(0), T)
    assert torch.allclose(indep.total, ce) and float(indep.parts["beta"]) == 0.0


def test_accuracy_weights():
    assert accuracy_weights([80.0, 60.0, 60.0]) == pytest.approx([0.4, 0.3, 0.3])
    assert accuracy_weights([0.0, 0.0]) == [0.5, 0.5]
    with pytest.raises(AggregatorError, match="finite and >= 0"):
        accuracy_weights([50.0, -1.0])
    # the aggregator follows the same rule: all-zero accuracies are equal weights
    assert AccuracyWeighted([0.0, 0.0, 0.0]).weights.tolist() == pytest.approx([1 / 3] * 3)


# ---------------------------------------------------------------------- soft labels
def test_soft_labels_are_eval_mode_unaugmented_and_indexed_by_sample():
    torch.manual_seed(0)
    net = SmallMLP().train()
    images, labels = make_data()
    x = (images.float() / 255 - 0.5) / 0.25
    shuffled = TensorLoader(images, labels, 7, mean=(0.5,), std=(0.25,), shuffle=True, with_index=True)
    sl = compute_soft_labels(net, shuffled, N, T)
    assert net.training  # mode restored
    net.eval()
    expected = torch.softmax(net(x) / T, -1)
    assert torch.allclose(sl.probs, expected, atol=1e-6)
    assert torch.equal(sl.labels, labels)
    assert sl.accuracy == pytest.approx(100.0 * float((net(x).argmax(-1) == labels).float().mean()))


def test_soft_label_loader_must_cover_every_sample_once():
    images, labels = make_data()
    dropping = TensorLoader(images, labels, 20, mean=(0.5,), std=(0.25,), drop_last=True, with_index=True)
    with pytest.raises(SoftLabelError, match="8 were never seen"):
        compute_soft_labels(SmallMLP(), dropping, N, T)


def test_loader_without_indices_is_rejected():
    images, labels = make_data()
    plain = TensorLoader(images, labels, 20, mean=(0.5,), std=(0.25,))
    with pytest.raises(SoftLabelError, match="with_index=True"):
        compute_soft_labels(SmallMLP(), plain, N, T)


def test_indexed_dataset_with_a_dataloader():
    ds = torch.utils.data.TensorDataset(torch.randn(6, 1, 8, 8), torch.arange(6) % 4)
    batch = next(iter(torch.utils.data.DataLoader(IndexedDataset(ds), batch_size=4)))
    _, _, y, idx = split_batch(batch)
    assert idx.tolist() == [0, 1, 2, 3] and y.tolist() == [0, 1, 2, 3]


# ---------------------------------------------------------------------- the protocol
def _expected_teacher(trainer: MDTrainer, val_loader=None):
    images, labels = make_data()
    x = (images.float() / 255 - 0.5) / 0.25
    probs, accs = [], []
    for peer in trainer.peers:
        peer.eval()
        with torch.no_grad():
            z = peer(x)
            probs.append(torch.softmax(z / T, -1))
            if val_loader is None:
                accs.append(float((z.argmax(-1) == labels).float().mean()))
            else:
                xv, yv = val_loader[0][:2]
                accs.append(float((peer(xv).argmax(-1) == yv).float().mean()))
        peer.train()
    a = [v / sum(accs) for v in accs]
    return a[0] * probs[0] + a[1] * probs[1], a


def test_md_teacher_is_the_accuracy_weighted_soft_labels_and_stays_fixed():
    trainer = make_trainer()
    trainer.fit(2)  # the independent phase of cycle 0
    assert trainer.teacher is None and trainer.soft_label_passes == 0
    expected, a = _expected_teacher(trainer)
    trainer.fit(3)  # first distillation epoch: soft labels computed now
    assert trainer.soft_label_passes == 1 and trainer.teacher_cycle == 0
    assert torch.allclose(trainer.teacher, expected, atol=1e-6)
    assert trainer.weights == pytest.approx(a, abs=1e-6)
    fixed = trainer.teacher.clone()
    trainer.fit(5)  # rest of the cycle: same S_e
    assert trainer.soft_label_passes == 1 and torch.equal(trainer.teacher, fixed)
    trainer.fit(8)  # cycle 1's distillation starts at epoch 7: fresh soft labels
    assert trainer.soft_label_passes == 2 and trainer.teacher_cycle == 1
    assert [(h["phase"], h["r"]) for h in trainer.history] == [
        ("independent", None), ("independent", None), ("distill", 0), ("distill", 1), ("distill", 2),
        ("independent", None), ("independent", None), ("distill", 0)]
    assert [h["alpha"] for h in trainer.history][2:5] == pytest.approx([1.0, 2 / 3, 1 / 3])


def test_weights_use_validation_accuracy_when_given():
    g = torch.Generator().manual_seed(5)
    val = [(torch.randn(12, 1, 8, 8, generator=g), torch.randint(0, 4, (12,), generator=g))]
    trainer = make_trainer(val_loader=val)
    trainer.fit(2)
    _, a = _expected_teacher(trainer, val_loader=val)
    trainer.fit(3)
    assert trainer.weights == pytest.approx(a, abs=1e-6) and trainer.cycles[0]["source"] == "validation"


def test_last_cycle_cut_short_keeps_full_cycle_values():
    trainer = make_trainer(IntervalSchedule(1, 4))
    trainer.fit(3)  # cycle 0: 1 independent + only 2 of its 4 distillation epochs
    assert [(h["phase"], h["r"], h["alpha"], h["beta"]) for h in trainer.history] == [
        ("independent", None, 1.0, 0.0), ("distill", 0, 1.0, 1.0), ("distill", 1, 0.75, 1.25)]
    ends_independent = make_trainer(IntervalSchedule(1, 1))
    ends_independent.fit(3)  # epoch 2 is cycle 1's independent epoch: its soft labels are never computed
    assert ends_independent.soft_label_passes == 1 and ends_independent.history[-1]["phase"] == "independent"


def test_baseline_is_ce_only_and_needs_no_indices():
    torch.manual_seed(0)
    cohort = bf.Cohort([SmallCNN(), SmallMLP()])
    opts = [torch.optim.SGD(cohort.peer_parameters(i), lr=0.1) for i in range(2)]
    images, labels = make_data()
    loader = TensorLoader(images, labels, BATCH, mean=(0.5,), std=(0.25,), shuffle=True)
    trainer = MDTrainer(cohort, opts, loader, schedule=None)
    history = trainer.fit(2, eval_loader=loader)
    assert [h["beta"] for h in history] == [0.0, 0.0] and trainer.soft_label_passes == 0
    assert len(history[-1]["accuracy"]) == 2


def test_resume_continues_the_cycle_with_identical_soft_labels(tmp_path):
    full = make_trainer()
    teachers = {}
    full.fit(8, callback=lambda rec: teachers.setdefault(rec["epoch"], full.teacher.clone()
                                                           if full.teacher is not None else None))

    class Crash(Exception):
        pass

    def crash_after_epoch_3(rec):
        if rec["epoch"] == 3:
            raise Crash

    first = make_trainer(checkpoint_dir=tmp_path)
    with pytest.raises(Crash):
        first.fit(8, callback=crash_after_epoch_3)
    resumed = make_trainer(checkpoint_dir=tmp_path)  # fresh process: new models, same config
    resumed.fit(8, callback=lambda rec: teachers.setdefault(("resumed", rec["epoch"]), resumed.teacher.clone()))
    assert resumed.resumed_from == 4 and resumed.history[4]["epoch"] == 4
    assert resumed.history[4]["r"] == 2  # continues cycle 0's distillation at r = 2
    assert torch.equal(teachers[("resumed", 4)], teachers[4])  # the stored S_e, not recomputed
    assert resumed.soft_label_passes == 1  # only cycle 1's soft labels were computed after the resume
    assert torch.allclose(teachers[("resumed", 7)], teachers[7], atol=1e-6)
    for a, b in zip(full.peers, resumed.peers):
        for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.allclose(va.float(), vb.float(), atol=1e-6), k
    for h_resumed, h_full in zip(resumed.history, full.history, strict=True):
        assert h_resumed["loss"] == pytest.approx(h_full["loss"], abs=1e-5)


def test_checkpoint_from_another_configuration_is_rejected(tmp_path):
    make_trainer(checkpoint_dir=tmp_path).fit(1)
    other = make_trainer(IntervalSchedule(3, 3), checkpoint_dir=tmp_path)
    with pytest.raises(MDError, match=r"schedule=\[2, 3, True\] but this run has \[3, 3, True\]"):
        other.fit(2)


def test_bad_configuration_errors():
    torch.manual_seed(0)
    cohort = bf.Cohort([SmallCNN(), SmallMLP()])
    train, plain = loaders()
    wrong = [torch.optim.SGD(cohort.peer_parameters(1), lr=0.1), torch.optim.SGD(cohort.peer_parameters(1), lr=0.1)]
    with pytest.raises(MDError, match=r"optimizer 0 holds .* cohort.peer_parameters\(0\)"):
        MDTrainer(cohort, wrong, train, soft_label_loader=plain, schedule=IntervalSchedule(1, 1))
    opts = [torch.optim.SGD(cohort.peer_parameters(i), lr=0.1) for i in range(2)]
    with pytest.raises(MDError, match="soft_label_loader"):
        MDTrainer(cohort, opts, train, schedule=IntervalSchedule(1, 1))
    with pytest.raises(MDError, match="branchify.Cohort"):
        MDTrainer([SmallCNN()], opts, train)
    images, labels = make_data()
    no_index = TensorLoader(images, labels, BATCH, mean=(0.5,), std=(0.25,))
    trainer = MDTrainer(cohort, opts, no_index, soft_label_loader=plain, schedule=IntervalSchedule(0, 1))
    with pytest.raises(SoftLabelError, match="without indices"):
        trainer.fit(1)
