"""A real lightning.Trainer (CPU) on a tiny branched CNN: ramp, logged parts, exact resume, export, DDP."""
from __future__ import annotations

import json
import sys
from functools import partial

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning")

import branchify as bf  # noqa: E402
from branchify.integrations.lightning import (CHECKPOINT_KEY, BranchifyCallback, OnlineKDModule,  # noqa: E402
                                              load_target, save_target, step_output)
from conftest import TinyCifarResNet  # noqa: E402

CLASSES, N, BATCH, EPOCHS, BATCHES = 5, 24, 8, 2, 3


def loader(n: int = N, batch: int = BATCH) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 16, 16, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


class Recording(OnlineKDModule):
    """Records okd.epoch and the loss parts of every training step (what the callback must log)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.epochs_seen: list[tuple[int, float]] = []
        self.parts_seen: list[tuple[int, dict[str, float]]] = []

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.epochs_seen.append((self.current_epoch, self.okd.epoch))
        self.parts_seen.append((self.current_epoch, {k: float(v) for k, v in out["okd_parts"].items()}))
        return out


def build(ramp: float = 1.0, cls: type = Recording) -> OnlineKDModule:
    torch.manual_seed(0)
    model, okd = bf.method("one", TinyCifarResNet(num_classes=CLASSES), ramp=ramp)
    return cls(model, okd, optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9),
               lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5))


def positions(epochs: range) -> list[tuple[int, float]]:
    """(epoch, epoch + batch / batches) of every training step of ``epochs``."""
    return [(e, e + b / BATCHES) for e in epochs for b in range(BATCHES)]


def assert_positions(seen: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    assert [e for e, _ in seen] == [e for e, _ in expected]
    assert [f for _, f in seen] == pytest.approx([f for _, f in expected], abs=1e-12)


def trainer(tmp_path, callbacks, **kwargs) -> L.Trainer:
    options = dict(max_epochs=EPOCHS, limit_train_batches=BATCHES, enable_progress_bar=False, logger=False,
                   enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=tmp_path,
                   enable_checkpointing=False)
    options.update(kwargs)
    return L.Trainer(callbacks=callbacks, **options)


class OkdAtTrainStart(L.Callback):
    """okd's schedule state when training (re)starts, after any checkpoint was restored."""

    def __init__(self) -> None:
        self.state = "not called"

    def on_train_start(self, trainer, pl_module):
        self.state = pl_module.okd.state_dict()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One uninterrupted 2-epoch fit with per-epoch checkpoints and an export (read by several tests)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tmp = tmp_path_factory.mktemp("full")
        module = build()
        ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp / "ckpt", filename="{epoch}", save_top_k=-1)
        t = trainer(tmp, [BranchifyCallback(export_dir=tmp / "student"), ckpt], enable_checkpointing=True,
                    num_sanity_val_steps=0)
        t.fit(module, loader(), loader())
    finally:
        torch.set_num_threads(before)
    return {"module": module, "trainer": t, "dir": tmp}


def test_ramp_moves_every_batch_with_the_trainer_position(full_run):
    module = full_run["module"]
    expected = positions(range(EPOCHS))
    assert_positions(module.epochs_seen, expected)
    assert module.okd.total_epochs == EPOCHS  # from Trainer(max_epochs=...)
    ramps = [parts["ramp"] for _, parts in module.parts_seen]
    assert ramps == pytest.approx([module.okd.ramp(ep, EPOCHS) for _, ep in expected], rel=1e-6)
    assert ramps[0] < ramps[3] < ramps[-1] < 1.0  # ramp=1.0: over the whole run, still rising at the end


def test_ramp_moves_once_per_epoch_without_per_step(tmp_path, one_thread):
    module = build()
    trainer(tmp_path, [BranchifyCallback(per_step=False)]).fit(module, loader())
    assert module.epochs_seen == [(e, float(e)) for e in range(EPOCHS) for _ in range(BATCHES)]


def test_logged_parts_are_the_epoch_means_of_the_loss_parts(full_run):
    module, metrics = full_run["module"], full_run["trainer"].callback_metrics
    last = [parts for epoch, parts in module.parts_seen if epoch == EPOCHS - 1]
    assert len(last) == BATCHES
    names = set(last[0])
    assert {"ce/leaf0", "ce/teacher", "kd/leaf0", "loss/ce", "loss/kd", "ramp"} <= names
    assert {k for k in metrics if k.startswith("okd/")} == {f"okd/{k}" for k in names}
    for name in names:  # equal batch sizes: the epoch mean is the plain mean
        expected = sum(p[name] for p in last) / BATCHES
        assert float(metrics[f"okd/{name}"]) == pytest.approx(expected, rel=1e-5), name


def test_validation_logs_the_target_leaf(full_run, one_thread):
    module, metrics = full_run["module"], full_run["trainer"].callback_metrics
    x, y = loader().dataset.tensors
    module.model.eval()
    with torch.no_grad():
        logits = module.model(x).logits[0]
    assert float(metrics["val/acc"]) == pytest.approx(float((logits.argmax(-1) == y).float().mean()))
    assert float(metrics["val/ce"]) == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-5)


def test_checkpoint_holds_the_schedule_and_a_resumed_fit_matches_bitwise(full_run, tmp_path, one_thread):
    ckpt_path = full_run["dir"] / "ckpt" / "epoch=0.ckpt"
    saved = torch.load(ckpt_path, weights_only=False)
    assert saved[CHECKPOINT_KEY]["okd"] == {"epoch": pytest.approx((BATCHES - 1) / BATCHES), "total_epochs": EPOCHS}
    assert any(k.startswith("model.aggregator.") for k in saved["state_dict"])  # the model owns the gate

    resumed, probe = build(), OkdAtTrainStart()
    assert resumed.okd.state_dict()["epoch"] is None
    trainer(tmp_path, [BranchifyCallback(), probe]).fit(resumed, loader(), ckpt_path=ckpt_path)
    assert probe.state == saved[CHECKPOINT_KEY]["okd"]  # restored before the first resumed batch
    assert_positions(resumed.epochs_seen, positions(range(1, EPOCHS)))

    expected = full_run["module"].state_dict()
    got = resumed.state_dict()
    assert got.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not different, different
    assert resumed.okd.state_dict() == full_run["module"].okd.state_dict()


def test_exported_target_reloads_strictly_and_reproduces_leaf_0(full_run, one_thread):
    student_dir, module = full_run["dir"] / "student", full_run["module"]
    info = json.loads((student_dir / "branchify.json").read_text())
    assert info["class"].endswith("TinyCifarResNet") and info["leaf"] == 0 and info["format"] == "torch"
    assert info["epoch"] == EPOCHS and info["spec"]["splits"] == ["layer3"]

    net = TinyCifarResNet(num_classes=CLASSES)
    net.load_state_dict(torch.load(student_dir / info["weights"], weights_only=True), strict=True)
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    module.model.eval(), net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), module.model(x).logits[0], rtol=1e-5, atol=1e-6)
        reloaded = load_target(student_dir, TinyCifarResNet(num_classes=CLASSES)).eval()
        assert torch.equal(reloaded(x), net(x))
    with pytest.raises(TypeError, match="holds a .*TinyCifarResNet.*pass an instance"):
        load_target(student_dir, torch.nn.Linear(2, 2))


def test_safetensors_export_round_trips(tmp_path, one_thread):
    torch.manual_seed(0)
    model, _ = bf.method("one", TinyCifarResNet(num_classes=CLASSES))
    save_target(model, tmp_path / "st", format="safetensors", leaf=2)
    info = json.loads((tmp_path / "st" / "branchify.json").read_text())
    assert info["weights"] == "model.safetensors" and info["leaf"] == 2
    net = load_target(tmp_path / "st", TinyCifarResNet(num_classes=CLASSES))
    want = model.export(2).state_dict()
    assert all(torch.equal(v, want[k]) for k, v in net.state_dict().items())


def test_training_step_without_parts_names_the_fix(tmp_path, one_thread):
    class PlainLoss(OnlineKDModule):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.okd(self.model(x), y).total

    with pytest.raises(TypeError, match=r"step_output\(loss\).*log_prefix=None"):
        trainer(tmp_path, [BranchifyCallback()], max_epochs=1, limit_train_batches=1).fit(
            build(cls=PlainLoss), loader())


def test_module_without_a_loss_fails_before_training(tmp_path, one_thread):
    class NoLoss(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model, _ = bf.method("one", TinyCifarResNet(num_classes=CLASSES))  # the loss is dropped

        def training_step(self, batch, batch_idx):  # pragma: no cover - never reached
            raise AssertionError("trained without a loss")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(TypeError, match=r"no OnlineKD attribute.*BranchifyCallback\(okd=okd\)"):
        trainer(tmp_path, [BranchifyCallback()]).fit(NoLoss(), loader())
    with pytest.raises(TypeError, match="step_output takes the LossOutput"):
        step_output(torch.zeros(()))


# ---------------------------------------------------------------------- DDP (2 CPU ranks, gloo)
class RankDump(L.Callback):
    """Each rank saves its weights, its logged metrics and its own per-step loss parts."""

    def __init__(self, out) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module):
        torch.save({"agg": {k: v.detach().clone() for k, v in pl_module.model.aggregator.named_parameters()},
                    "params": {k: v.detach().clone() for k, v in pl_module.named_parameters()},
                    "state": {k: v.clone() for k, v in pl_module.state_dict().items()},
                    "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
                    "parts": pl_module.parts_seen, "epochs": pl_module.epochs_seen},
                   self.out / f"rank{trainer.global_rank}.pt")


@pytest.mark.parametrize("strategy", ["ddp_fork", pytest.param("ddp_spawn", marks=pytest.mark.slow)])
def test_ddp_two_ranks_keep_the_aggregator_identical(tmp_path, strategy, one_thread, monkeypatch):
    """ddp_fork takes seconds (the ranks inherit the imports); ddp_spawn re-imports torch and lightning
    in every rank (about a minute on a busy 2-core machine), so it is marked slow."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if strategy == "ddp_fork" and (not sys.platform.startswith("linux") or torch.cuda.is_initialized()):
        pytest.skip("ddp_fork needs Linux and a process without CUDA initialised (run -m slow for ddp_spawn)")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # else Lightning's launcher sets it (and torch's threads) for good
    module = build()
    init_agg = {k: v.detach().clone() for k, v in module.model.aggregator.named_parameters()}
    t = trainer(tmp_path, [BranchifyCallback(export_dir=tmp_path / "student"), RankDump(tmp_path)],
                strategy=strategy, devices=2, limit_train_batches=None)
    t.fit(module, loader(n=2 * BATCHES * 4, batch=4))  # 3 batches of 4 per rank
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    assert ranks[0]["epochs"] == ranks[1]["epochs"]
    assert_positions(ranks[0]["epochs"], positions(range(EPOCHS)))
    assert ranks[0]["parts"] != ranks[1]["parts"]  # each rank saw its own half of the data
    for k, v in ranks[0]["agg"].items():
        assert torch.equal(v, ranks[1]["agg"][k]), k
    assert any(not torch.equal(v, init_agg[k]) for k, v in ranks[0]["agg"].items())  # the gate trained
    for k, v in ranks[0]["params"].items():  # every parameter; BN running stats are rank-local (see module doc)
        assert torch.equal(v, ranks[1]["params"][k]), k

    assert ranks[0]["metrics"] == ranks[1]["metrics"]  # sync_dist: every rank logs the cross-rank mean
    for name in ("ce/leaf0", "loss/kd"):
        local = [sum(p[name] for e, p in r["parts"] if e == EPOCHS - 1) / BATCHES for r in ranks]
        assert ranks[0]["metrics"][f"okd/{name}"] == pytest.approx(sum(local) / 2, rel=1e-5)

    net = load_target(tmp_path / "student", TinyCifarResNet(num_classes=CLASSES))  # written by rank 0
    want = {k.split(".", 3)[3]: v for k, v in ranks[0]["state"].items()
            if k.startswith(("model.segments.trunk.", "model.segments.b0."))}  # leaf 0 = trunk + branch 0
    assert net.state_dict().keys() == want.keys()
    assert all(torch.equal(v, want[k]) for k, v in net.state_dict().items())
