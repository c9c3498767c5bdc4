"""The unchanged transformers Trainer on branched HF models: loss, logging, export, resume."""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import branchify as bf  # noqa: E402
from branchify.integrations.hf import (BranchedHFModel, BranchifyCallback, branchify_hf,  # noqa: E402
                                       default_hf_splits, infer_task)
from branchify.online_kd import OnlineKD  # noqa: E402
from gloo_ranks import run_ranks  # noqa: E402
from hf_tiny_models import AUTO, FAMILIES, SPLITS, make_batch, make_model  # noqa: E402

ATOL = 1e-5


class Batches(torch.utils.data.Dataset):
    """A map-style dataset over one dict of stacked tensors (what a tokenised dataset yields)."""

    def __init__(self, family: str, n: int = 8, seed: int = 0) -> None:
        self.data = make_batch(family, batch=n, seed=seed)

    def __len__(self) -> int:
        return len(next(iter(self.data.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.data.items()}


def _args(out, **kw):
    base = dict(per_device_train_batch_size=4, per_device_eval_batch_size=4, report_to=[], use_cpu=True,
                disable_tqdm=True, logging_steps=1, save_strategy="no", learning_rate=5e-3, seed=0,
                dataloader_num_workers=0)
    base.update(kw)
    return transformers.TrainingArguments(str(out), **base)


def _wrap(family, method="one", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return branchify_hf(make_model(family), method, split=kw.pop("split", SPLITS[family]), **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_trainer_trains_exports_and_reloads(family, tmp_path):
    model = _wrap(family)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=Batches(family),
                                   eval_dataset=Batches(family, n=4, seed=1), callbacks=[BranchifyCallback()])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all("okd/loss/kd" in h and "okd/ce/leaf0" in h for h in logs)
    metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))

    export_dir = tmp_path / "exported-target"
    reloaded = getattr(transformers, AUTO[family]).from_pretrained(export_dir).eval()
    assert type(reloaded).__name__ == model.model_class.__name__
    model.eval()
    batch = make_batch(family, labels=False, seed=5)
    with torch.no_grad():
        leaf = model.branched(**batch).logits[model.target]
        assert torch.allclose(model(**batch).logits, leaf)  # the Trainer sees the target's logits
        assert torch.allclose(reloaded(**batch).logits, leaf, atol=ATOL)
    info = json.loads((export_dir / "branchify.json").read_text())
    assert info["leaf"] == 0 and info["spec"]["splits"] == [SPLITS[family]]


def test_tsa_checkpoints_carry_the_export(tmp_path):
    model = _wrap("bert", "tsa", split=["bert.encoder.layer.1", "bert.encoder.layer.2"], target=2)
    assert model.branched.num_leaves == 4 and model.target == 2
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, max_steps=2, save_strategy="steps",
                                                           save_steps=1),
                                   train_dataset=Batches("bert"), callbacks=[BranchifyCallback()])
    trainer.train()
    model.eval()
    batch = make_batch("bert", labels=False, seed=2)
    for step in (1, 2):
        ckpt = tmp_path / f"checkpoint-{step}" / "exported-target"
        assert (ckpt / "config.json").is_file()
    reloaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "checkpoint-2" /
                                                                          "exported-target").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, model.branched(**batch).logits[2], atol=ATOL)


class _EpochProbe(transformers.TrainerCallback):
    """Records the epoch the loss object was given at every step (runs after BranchifyCallback)."""

    def __init__(self, model):
        self.model, self.seen = model, {}

    def on_step_begin(self, args, state, control, **kwargs):
        self.seen[state.global_step] = (self.model.okd.epoch, self.model.okd.ramp_value())


def test_resume_continues_the_schedules(tmp_path):
    def run(out, resume=None, max_epochs=3):
        model = _wrap("bert", ramp=2)  # sigmoid ramp over 2 epochs: every step has its own weight
        probe = _EpochProbe(model)
        args = _args(out, num_train_epochs=max_epochs, save_strategy="epoch")
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Batches("bert"),
                                       callbacks=[BranchifyCallback(), probe])
        trainer.train(resume_from_checkpoint=resume)
        return probe.seen

    full = run(tmp_path / "full")
    assert sorted(full) == [0, 1, 2, 3, 4, 5]  # 8 examples / batch 4 = 2 steps per epoch, 3 epochs
    resumed = run(tmp_path / "full", resume=str(tmp_path / "full" / "checkpoint-4"))
    assert sorted(resumed) == [4, 5]
    for step in (4, 5):
        assert resumed[step][0] == pytest.approx(full[step][0])  # epoch 2.0 and 2.5, not 0 again
        assert resumed[step][1] == pytest.approx(full[step][1])
    assert resumed[4][0] == pytest.approx(2.0)


@pytest.mark.parametrize("family", ["bert", "gpt2_lm", "t5", "marian"])
def test_single_leaf_loss_equals_the_models_own_loss(family):
    """CE per token with -100 masked, the causal shift and seq2seq decoder inputs match HF's loss."""
    model = make_model(family).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bm = bf.branchify(model, bf.Spec(splits=[SPLITS[family]], fanout=[1]))
    wrapped = BranchedHFModel(bm, OnlineKD(bm, None), model).eval()
    batch = make_batch(family, seed=4)
    assert torch.allclose(wrapped(**batch).loss, model(**batch).loss, atol=ATOL)


def test_token_level_kd_ignores_masked_positions():
    """With -100 labels on right padding, changing the padded tokens changes no part of the loss."""
    model = _wrap("gpt2_lm", "tsa", split=["transformer.h.1", "transformer.h.2"]).eval()
    model.okd.set_epoch(1.0, 2)
    batch = make_batch("gpt2_lm", pad_from=5)
    labels = batch.pop("labels")
    pads = batch["attention_mask"] == 0
    other = dict(batch, input_ids=batch["input_ids"].masked_fill(pads, 9))
    a = model.compute_loss(model.branched_output(**batch)[0], labels)
    b = model.compute_loss(model.branched_output(**other)[0], labels)
    assert a.parts["loss/kd"] > 0
    for k in a.parts:
        assert torch.allclose(a.parts[k], b.parts[k], atol=1e-6), k
    # Unmasked labels on the same positions would count them (the check is sensitive).
    c = model.compute_loss(model.branched_output(**batch)[0], batch["input_ids"])
    d = model.compute_loss(model.branched_output(**other)[0], other["input_ids"])
    assert not torch.allclose(c.parts["loss/kd"], d.parts["loss/kd"], atol=1e-6)


def test_task_and_default_splits():
    assert [infer_task(make_model(f)) for f in ("bert", "vit", "gpt2_lm", "gpt2_cls", "t5")] == [
        "classification", "classification", "causal", "classification", "seq2seq"]
    assert default_hf_splits(make_model("bert"), 2) == ["bert.encoder.layer.1", "bert.encoder.layer.2"]
    assert default_hf_splits(make_model("marian"), 1) == ["model.decoder.layers.2"]
    model = branchify_hf(make_model("vit"), "one")  # default split: the last layer
    assert model.branched.spec.splits == ["vit.layers.2"]


def test_unknown_override_is_rejected():
    with pytest.raises(ValueError, match="does not take"):
        branchify_hf(make_model("bert"), "one", split="bert.encoder.layer.1", alpah=0.3)


def test_state_dict_is_safetensors_clean(tmp_path):
    """Tied weights inside one segment (T5's embeddings in the trunk) still save as safetensors."""
    from safetensors.torch import load_file, save_file

    model = _wrap("t5")
    sd = model.state_dict()
    save_file(sd, os.fspath(tmp_path / "m.safetensors"))
    loaded = load_file(os.fspath(tmp_path / "m.safetensors"))
    fresh = _wrap("t5")
    fresh.load_state_dict(loaded)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k


# ---------------------------------------------------------------------- one preset path
def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def test_branchify_hf_sizes_the_gate_at_the_cut():
    """Swin's stages widen 16 -> 32 -> 64: a cut before stage 1 feeds the gate 32 channels, not
    config.hidden_size (64, the last stage's width)."""
    from hf_tiny_models import make_zoo_batch, make_zoo_model

    swin = make_zoo_model("swin")
    assert swin.config.hidden_size == 64
    model = _quiet(branchify_hf, swin, "one", split="swin.encoder.layers.1")
    gate = model.branched.aggregator
    assert gate.channels == gate.fc.in_features == model.branched.cut_channels(()) == 32
    bm, _ = _quiet(bf.method, "one", make_zoo_model("swin"), split="swin.encoder.layers.1")
    assert bm.aggregator.fc.in_features == 32
    model.okd.set_epoch(0, 3)
    out = model(**make_zoo_batch("swin"))
    assert torch.isfinite(out.loss) and out.logits.shape == (2, 3)


@pytest.mark.parametrize("method", ["one", "tsa", "okddip", "dml"])
def test_branchify_hf_builds_what_bf_method_builds(method):
    """Same spec, aggregator (with the same parameter shapes), loss settings and split reason."""
    wrapped = _quiet(branchify_hf, make_model("bert"), method)
    bm, okd = _quiet(bf.method, method, make_model("bert"))
    assert wrapped.branched.spec.to_dict() == bm.spec.to_dict()
    assert wrapped.branched.split_reason == bm.split_reason
    assert type(wrapped.branched.aggregator) is type(bm.aggregator)
    shapes = {k: v.shape for k, v in bm.aggregator.state_dict().items()}
    assert {k: v.shape for k, v in wrapped.branched.aggregator.state_dict().items()} == shapes
    for attr in ("temperature", "ce_weight", "kd_weight", "detach", "teacher_weight", "teacher_temperature"):
        assert getattr(wrapped.okd, attr) == getattr(okd, attr), attr
    wrapped.okd.set_epoch(1, 4)
    okd.set_epoch(1, 4)
    assert wrapped.okd.ramp_value() == okd.ramp_value()


@pytest.mark.parametrize("method, bad", [
    ("one", {"alpah": 0.3}),                                  # unknown option, with a suggestion
    ("one", {"branches": 0}),                                 # invalid value
    ("one", {"split": ["bert.encoder.layer.1", "bert.encoder.layer.2"]}),  # wrong number of splits
    ("onee", {}),                                             # unknown method
], ids=["unknown-option", "bad-value", "split-count", "unknown-method"])
def test_branchify_hf_errors_are_bf_methods(method, bad):
    from branchify.methods import MethodError

    with pytest.raises(MethodError) as expected:
        bf.method(method, make_model("bert"), **bad)
    with pytest.raises(MethodError) as got:
        branchify_hf(make_model("bert"), method, **bad)
    assert str(got.value) == str(expected.value)


def test_branchify_hf_builds_a_newly_registered_preset(monkeypatch):
    """No preset names are hard-coded: a preset registered later works, defaults and all."""
    from branchify.methods import get_preset, presets

    one = get_preset("one")
    monkeypatch.setitem(presets._REGISTRY, "one_five",
                        presets.Preset("one_five", "ONE, 5 leaves", {**one.defaults, "branches": 5}, one.build))
    model = _quiet(branchify_hf, make_model("bert"), "one_five", temperature=2.0)
    assert model.branched.num_leaves == 5 and model.branched.spec.splits == ["bert.encoder.layer.2"]
    assert model.okd.temperature == 2.0 and model.branched.aggregator.fc.out_features == 5


def test_encoder_decoder_default_split_is_in_the_decoder():
    """The generic rule ties the equal encoder / decoder stacks and takes the encoder; branchify_hf
    cuts the decoder (see default_hf_splits)."""
    from hf_tiny_models import make_zoo_model

    bm, _ = _quiet(bf.method, "tsa", make_zoo_model("t5"))
    assert bm.spec.splits == ["encoder.block.1", "encoder.block.2"]
    model = _quiet(branchify_hf, make_zoo_model("t5"), "tsa")
    assert model.branched.spec.splits == ["decoder.block.1", "decoder.block.2"]
    assert model.branched.split_reason.startswith("default split ['decoder.block.1', 'decoder.block.2']: the "
                                                  "decoder stack")
    assert default_hf_splits(make_zoo_model("t5"), 1) == ["decoder.block.2"]
    assert default_hf_splits(make_zoo_model("bert"), 1) == ["bert.encoder.layer.2"]  # the generic rule


# ---------------------------------------------------------------------- loss parts across ranks
def _rank_batches(rank: int) -> list[dict[str, torch.Tensor]]:
    """Rank 0 runs one forward, rank 1 two: the logged mean is over forwards, not over rank means."""
    return [make_batch("bert", seed=10 + 10 * rank + i) for i in range(rank + 1)]


def _parts_worker(rank: int, port: int, out: str, model: BranchedHFModel) -> None:
    import datetime

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    model.train()
    for batch in _rank_batches(rank):
        model(**batch)
    state = transformers.TrainerState()
    state.global_step = 1
    state.log_history = [{"loss": 0.5, "step": 1}]
    logs = {"loss": 0.5}
    BranchifyCallback().on_log(None, state, None, logs=logs, model=model)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"logs": logs, "history": state.log_history[-1]}, f)
    torch.distributed.destroy_process_group()


def test_logged_loss_parts_are_the_mean_over_ranks(tmp_path):
    """Two gloo ranks: every rank logs the mean of each loss part over all ranks' forwards."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")  # before the expected parts are computed
    model = _wrap("bert")
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # deterministic forwards: the expected parts are recomputed here
    model.okd.set_epoch(1, 2)
    model.train()
    parts = []
    with torch.no_grad():
        for rank in (0, 1):
            for batch in _rank_batches(rank):
                labels = batch.pop("labels")
                parts.append(model.compute_loss(model.branched_output(**batch)[0], labels).parts)
    expected = {k: sum(float(p[k]) for p in parts) / len(parts) for k in parts[0]}
    assert model.pop_logged_parts() == {}
    run_ranks(_parts_worker, (str(tmp_path), model), nprocs=2, timeout=60)
    for rank in (0, 1):
        saved = json.loads((tmp_path / f"rank{rank}.json").read_text())
        logged = {k[len("okd/"):]: v for k, v in saved["logs"].items() if k.startswith("okd/")}
        assert set(logged) == set(expected)
        for k, v in expected.items():
            assert logged[k] == pytest.approx(v, abs=2e-6), k
        assert saved["history"]["okd/loss/kd"] == saved["logs"]["okd/loss/kd"]
    # The check is sensitive: rank 0's own parts, and the mean of the two ranks' means, are farther off.
    rank_means = {k: (float(parts[0][k]) + (float(parts[1][k]) + float(parts[2][k])) / 2) / 2 for k in expected}
    assert max(abs(float(parts[0][k]) - v) for k, v in expected.items()) > 5e-4
    assert max(abs(rank_means[k] - v) for k, v in expected.items()) > 1e-4
