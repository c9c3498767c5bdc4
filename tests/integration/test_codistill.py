"""branchify-train --codistill: 2 groups x 2 gloo ranks at K=1 train exactly like two models
distilling in one process; a killed group does not stop the other and rejoins with --resume;
ranks started with different configs all fail with one message."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from branchify.recipes.config import RunConfig

from gloo_ranks import free_port

FLAGS = ["--dataset", "fashion_mnist", "--model", "resnet20", "--fake-data", "--batch-size", "8", "--lr", "0.001",
         "--set", "fake_batches=3", "--set", "freeze_bn=true", "--device", "cpu", "--no-progress", "--no-plots",
         "--threads", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "branchify.recipes.cli", *FLAGS, *args]


def _run(cmd: list[str], timeout: float = 240, env: dict[str, str] | None = None) -> str:
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env or ENV, text=True,
                       timeout=timeout)
    assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout[-4000:]}"
    return p.stdout


def _reference(cfg: RunConfig, kd: bool) -> list[dict[str, torch.Tensor]]:
    """Two models in one process: each step both see their own whole batch, each distils from the
    other's logits on it (computed before either updates), SGD as the recipe builds it."""
    from branchify.recipes.codistill import group_seed
    from branchify.recipes.train import _loaders, _lr_lambda
    from branchify.recipes.zoo import build_model

    train_loader, _, meta = _loaders(cfg, torch.device("cpu"))
    loaders, nets, opts, scheds = [], [], [], []
    for g in range(2):
        loader = copy.copy(train_loader)
        loader.seed = group_seed(cfg.seed, g)
        loader._generator = torch.Generator()
        loaders.append(loader)
        torch.manual_seed(cfg.seed + g)
        net = build_model(cfg.model, meta.num_classes, meta.in_channels).eval()  # freeze_bn: BN in eval mode
        opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        nets.append(net), opts.append(opt)
        scheds.append(torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, len(train_loader))))
    for epoch in range(cfg.epochs):
        for loader in loaders:
            loader.set_epoch(epoch)
        for batches in zip(*loaders):
            with torch.no_grad():
                teacher = [nets[1 - g](batches[g][0]) for g in range(2)]
            losses = []
            for g, (x, y) in enumerate(batches):
                z = nets[g](x)
                loss = F.cross_entropy(z, y)
                if kd:
                    loss = loss + F.kl_div(F.log_softmax(z, -1), F.log_softmax(teacher[g], -1), log_target=True,
                                           reduction="batchmean")
                losses.append(loss)
            for g in range(2):
                opts[g].zero_grad()
                losses[g].backward()
                opts[g].step()
                scheds[g].step()
    return [n.state_dict() for n in nets]


def test_two_groups_of_two_gloo_ranks_at_k1_equal_two_models_distilling_in_one_process(tmp_path):
    out = tmp_path / "collective"
    t0 = time.monotonic()
    log = _run(_cli("--codistill", "2", "--nproc", "4", "--exchange-every", "1", "--epochs", "2",
                    "--set", "method_args.via=collective", "--out", str(out)))
    seconds = time.monotonic() - t0
    cfg = RunConfig.from_dict(json.loads((out / "run.json").read_text())["config"])
    want, plain = _reference(cfg, kd=True), _reference(cfg, kd=False)
    for g in range(2):
        got = load_file(out / "exported" / f"group{g}" / "model.safetensors")
        assert got.keys() == want[g].keys()
        for k in got:
            torch.testing.assert_close(got[k], want[g][k], atol=2e-6, rtol=0, msg=f"group {g}: {k}")
        gap = max((want[g][k].float() - plain[g][k].float()).abs().max().item() for k in got)
        assert gap > 1e-5, f"distillation changed group {g} by only {gap}: the comparison would prove nothing"
    summary = json.loads((out / "results.json").read_text())
    assert [r["teachers_at_end"] for r in summary["groups"]] == [[1], [0]]
    params = sum(t.numel() for k, t in want[0].items() if "running" not in k and "num_batches" not in k)
    received = summary["groups"][0]["history"][-1]["bytes/cross_group_received"]
    assert received == 6 * sum(t.numel() * t.element_size() for t in want[0].values())  # 6 steps x 1 peer
    assert summary["groups"][0]["allreduce"]["gradient_bytes"] == 4 * params
    assert "ensemble (mean softmax)" in (out / "summary.md").read_text() and "all 2 groups finished" in log
    print(f"codistill K=1 2x2 gloo run: {seconds:.1f} s")


def _wait_for(path: Path, proc: subprocess.Popen, log: Path, limit: float) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, f"group ended before it was killed:\n{log.read_text()[-3000:]}"
        assert time.monotonic() - t0 < limit, f"{path} did not appear within {limit} s"
        time.sleep(0.02)


def _as_rank(port: int) -> dict[str, str]:
    """The environment torchrun gives a single-process job: the CLI then runs as that one rank."""
    return {**ENV, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}


def test_a_killed_group_does_not_stop_the_other_and_rejoins_with_resume(tmp_path):
    out = tmp_path / "files"
    common = ["--codistill", "2", "--exchange-every", "1", "--epochs", "3", "--set", "method_args.wait_s=4",
              "--out", str(out)]
    logs = [tmp_path / f"group{g}.log" for g in range(2)]
    # each group a one-rank job of its own (what `--nproc 2` starts with one torchrun per group)
    procs = [subprocess.Popen(_cli(*common, "--group", str(g)), stdout=logs[g].open("w"), stderr=subprocess.STDOUT,
                              env=_as_rank(free_port())) for g in range(2)]
    try:
        _wait_for(out / "checkpoints" / "codistill-g1.pt", procs[1], logs[1], 150)
        procs[1].kill()
        procs[1].wait()
        assert procs[0].wait(timeout=150) == 0, logs[0].read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    survivor = logs[0].read_text()
    assert "teacher set shrinks to [] at step" in survivor and "group 1" in survivor
    assert "group 0 finished: 3 epochs" in survivor and "teachers at the end [] of [1]" in survivor
    assert "the ensemble is written when group(s) [1] finish" in survivor
    killed_at = torch.load(out / "checkpoints" / "codistill-g1.pt", weights_only=True)["epoch"]
    assert killed_at < 3
    resumed = _run([sys.executable, "-m", "branchify.recipes.cli", "--resume", str(out), "--group", "1",
                    "--no-progress", "--threads", "1"], env=_as_rank(free_port()))
    assert f"group 1 resumes after epoch {killed_at}" in resumed
    assert "group 0 (re)joins the teacher set" in resumed and "all 2 groups finished" in resumed
    summary = json.loads((out / "results.json").read_text())
    assert [r["epochs"] for r in summary["groups"]] == [3, 3]
    assert summary["groups"][1]["resumed_from_epoch"] == killed_at
    assert summary["groups"][1]["teachers_at_end"] == [0]
    assert [h["epoch"] for h in summary["groups"][1]["history"]] == [1, 2, 3]


def test_the_cpu_benchmark_counts_bytes_and_churn_per_configuration(tmp_path):
    from benchmarks.codistill_cpu import main as bench

    assert bench(["--steps", "4", "--train-size", "100", "--test-size", "100", "--burn-in", "1", "--seeds", "0,1",
                  "--ks", "1,2", "--no-logits", "--depth", "8", "--out", str(tmp_path), "--name", "t"]) == 0
    res = json.loads((tmp_path / "t.json").read_text())
    assert res["machine"]["torch"] == torch.__version__ and "| codistill-2 | 2 |" in (tmp_path / "t.md").read_text()
    rows = {r["config"]: r for r in res["summary"]}
    weights = res["runs"][0]["weights_bytes"]
    assert rows["independent"]["cross_group_bytes_per_step"] == 0
    assert rows["codistill-1"]["cross_group_bytes_per_step"] == weights * 3 / 4  # steps 1, 2, 3 (burn-in 1)
    assert rows["codistill-2"]["cross_group_bytes_per_step"] == weights * 2 / 4  # steps 1 and 3
    ring = {k: rows[k]["allreduce_bytes_per_rank_per_step"] for k in ("ddp", "independent")}
    assert ring["ddp"] == 1.5 * ring["independent"]  # 2 (D - 1) / D: 3/2 of the gradients at D = 4, 1 at D = 2
    for kind in ("independent", "ddp"):  # churn: two seeds' test predictions compared by hand
        a, b = (r["predictions"] for r in res["runs"] if r["kind"] == kind)
        assert rows[kind]["churn"][0] == pytest.approx(100 * sum(p != q for p, q in zip(a, b)) / len(a))
