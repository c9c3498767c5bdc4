"""branchify-train --nproc 2: two gloo processes under torchrun train like one process on the whole
batches (each rank takes half of every global batch, DDP averages the gradients), aggregator
included; bad launches fail before any process starts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from branchify.recipes.checkpoint import checkpoint_path
from branchify.recipes.cli import main as cli_main
from branchify.recipes.config import RunConfig
from branchify.recipes.train import build

METHODS = ["dml", "one"]
# BatchNorm in eval mode (freeze_bn): train-mode BN would normalise each rank's half on its own.
# A small LR keeps float32 rounding differences (summation order) from being amplified: with
# frozen BN at initialisation these nets are ill-conditioned, and even an in-process emulation
# (halves' gradients averaged by hand) drifts from the full batch by ~1e-5 at lr 0.01 (ONE).
FLAGS = ["--dataset", "fashion_mnist", "--model", "resnet20", "--methods", ",".join(METHODS), "--fake-data",
         "--epochs", "2", "--batch-size", "8", "--lr", "0.001", "--set", "fake_batches=2", "--set", "freeze_bn=true",
         "--device", "cpu", "--no-progress"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "branchify.recipes.cli", "--threads", "1", "--no-plots", *FLAGS, *args]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    single, ddp = root / "single", root / "ddp"
    t0 = time.monotonic()
    procs = {d: subprocess.Popen(_cli("--out", str(d), *extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 env=ENV, text=True)
             for d, extra in ((single, []), (ddp, ["--nproc", "2"]))}
    for d, p in procs.items():
        try:
            out, _ = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        assert p.returncode == 0, f"{d.name} run failed ({p.returncode}):\n{out[-4000:]}"
    return single, ddp, time.monotonic() - t0


def test_two_gloo_ranks_train_like_one_process_on_the_whole_batches(runs):
    single, ddp, seconds = runs
    results = json.loads((ddp / "results.json").read_text())
    assert results["machine"]["world_size"] == 2 and "x 2 processes (DDP)" in results["header"]
    cfg = RunConfig.from_dict(json.loads((single / "run.json").read_text())["config"])
    for m in METHODS:
        a = load_file(single / "exported" / f"{m}-seed0" / "model.safetensors")
        b = load_file(ddp / "exported" / f"{m}-seed0" / "model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=f"exported {m}: {k}")
        full_a = torch.load(checkpoint_path(single, m, 0), weights_only=True)["model"]
        full_b = torch.load(checkpoint_path(ddp, m, 0), weights_only=True)["model"]
        for k in full_a:  # every tensor of the trained model: all peers and the aggregator
            torch.testing.assert_close(full_b[k], full_a[k], atol=1e-6, rtol=0, msg=f"{m} model state: {k}")
        torch.manual_seed(0)  # the initial weights, built as train() builds them
        init = build(cfg.replace(method=m), 10, 1)[0].state_dict()
        moved = max((full_a[k].float() - init[k].float()).abs().max().item() for k in init)
        assert moved > 1e-4, f"{m} barely trained ({moved}), so the comparison would prove nothing"
    assert any(k.startswith("aggregator.") for k in full_a)  # ONE's gate, trained through DDP
    print(f"DDP test: single + 2-rank runs in {seconds:.1f} s")


def test_logged_loss_parts_are_the_rank_average(runs):
    single, ddp, _ = runs

    def records(d):
        return [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]

    one, two = records(single), records(ddp)
    assert [(r["method"], r["epoch"]) for r in one] == [(r["method"], r["epoch"]) for r in two]
    for r1, r2 in zip(one, two):
        assert r2["train_loss"] == pytest.approx(r1["train_loss"], rel=1e-5)
        assert r1["loss_parts"].keys() == r2["loss_parts"].keys() and "ce/leaf0" in r1["loss_parts"]
        for k, v in r1["loss_parts"].items():
            assert r2["loss_parts"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
        assert r2["target_acc"] == r1["target_acc"]


def test_a_bad_data_parallel_launch_fails_before_any_process_starts(runs, capsys, one_thread):
    _, ddp, _ = runs
    t0 = time.monotonic()
    assert cli_main([*FLAGS, "--nproc", "2", "--out", str(ddp)]) == 2
    assert f"--resume {ddp}" in capsys.readouterr().err
    assert cli_main([*FLAGS, "--nproc", "2", "--methods", "dml,oen", "--out", str(ddp / "new")]) == 2
    assert "unknown method 'oen'; did you mean 'one'?" in capsys.readouterr().err
    assert not (ddp / "new").exists() and time.monotonic() - t0 < 30
