"""branchify-train --codistill: 2 groups x 2 gloo ranks at K=1 train exactly like two models
distilling in one process; a killed group does not stop the other and rejoins with --resume; the
launcher (--nproc) runs one torchrun job per group; the CPU benchmark counts bytes and churn.

The ranks are forked from the test process and run the CLI's ``main`` as torchrun would start it
(``RANK``/``WORLD_SIZE``/``MASTER_*`` set), so they skip the interpreter start and the imports
(seconds each on a busy 2-core machine); the launcher test starts real torchrun jobs."""
from __future__ import annotations

import copy
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from gloo_ranks import free_port, run_ranks
from safetensors.torch import load_file

from branchify.recipes.cli import main as cli_main
from branchify.recipes.config import RunConfig

FLAGS = ["--dataset", "fashion_mnist", "--model", "resnet20", "--fake-data", "--batch-size", "8", "--lr", "0.001",
         "--set", "fake_batches=3", "--set", "freeze_bn=true", "--device", "cpu", "--no-progress", "--no-plots",
         "--threads", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _as_rank(rank: int, world: int, port: int, argv: list[str]) -> None:
    """Run the CLI as rank ``rank`` of a ``world``-rank torchrun job; raise on a non-zero exit."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    code = cli_main(argv)
    if code:
        raise SystemExit(code)


def _collective_rank(rank: int, port: int, argv: list[str]) -> None:
    _as_rank(rank, 4, port, argv)


def _events(out: Path) -> list[str]:
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r["message"] for r in lines if r.get("event") == "codistill"]


def _reference(cfg: RunConfig, kd: bool, shared_batch: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Two models in one process: each step both see their own whole batch, each distils from the
    other's logits on it (computed before either updates), SGD as the recipe builds it. With
    ``shared_batch`` (logits mode) each distils on the shared micro-batch instead."""
    from branchify.distributed.codistill import CodistillOptions
    from branchify.recipes.codistill import _shared_loader, group_seed
    from branchify.recipes.train import _loaders, _lr_lambda
    from branchify.recipes.zoo import build_model

    train_loader, _, meta = _loaders(cfg, torch.device("cpu"))
    shared = None
    if shared_batch is not None:
        options = CodistillOptions(groups=2, exchange="logits", shared_batch=shared_batch)
        shared = _shared_loader(train_loader, options, cfg.seed)
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
        for loader in loaders + ([shared] if shared is not None else []):
            loader.set_epoch(epoch)
        shared_iter = iter(shared) if shared is not None else None
        for batches in zip(*loaders):
            sx = next(shared_iter)[0] if shared_iter is not None else None
            with torch.no_grad():
                teacher = [nets[1 - g](batches[g][0] if sx is None else sx) for g in range(2)]
            losses = []
            for g, (x, y) in enumerate(batches):
                z = nets[g](x)
                zs = z if sx is None else nets[g](sx)
                loss = F.cross_entropy(z, y)
                if kd:
                    loss = loss + F.kl_div(F.log_softmax(zs, -1), F.log_softmax(teacher[g], -1), log_target=True,
                                           reduction="batchmean")
                losses.append(loss)
            for g in range(2):
                opts[g].zero_grad()
                losses[g].backward()
                opts[g].step()
                scheds[g].step()
    return [n.state_dict() for n in nets]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_two_groups_of_two_gloo_ranks_at_k1_equal_two_models_distilling_in_one_process(tmp_path, parallel):
    out = tmp_path / "collective"
    t0 = time.monotonic()
    argv = [*FLAGS, "--codistill", "2", "--exchange-every", "1", "--epochs", "2", "--set", "method_args.via=collective",
            "--set", f"method_args.parallel={parallel}", "--out", str(out)]
    run_ranks(_collective_rank, (argv,), nprocs=4, timeout=120)
    seconds = time.monotonic() - t0
    cfg = RunConfig.from_dict(json.loads((out / "run.json").read_text())["config"])
    want, plain = _reference(cfg, kd=True), _reference(cfg, kd=False)
    for g in range(2):
        got = load_file(out / "exported" / f"group{g}" / "model.safetensors")
        assert got.keys() == want[g].keys()
        for k in got:
            torch.testing.assert_close(got[k], want[g][k], atol=2e-6, rtol=0,
                                       msg=lambda m, g=g, k=k: f"group {g}: {k}: {m}")
        gap = max((want[g][k].float() - plain[g][k].float()).abs().max().item() for k in got)
        assert gap > 1e-5, f"distillation changed group {g} by only {gap}: the comparison would prove nothing"
        ckpt = torch.load(out / "checkpoints" / f"codistill-g{g}.pt", weights_only=True)  # whole tensors
        assert all(torch.equal(ckpt["model"][k], got[k]) for k in got) and ckpt["epoch"] == 2
        momenta = [v["momentum_buffer"] for v in ckpt["optimizer"]["state"].values()]
        assert sorted(m.numel() for m in momenta) == sorted(t.numel() for k, t in got.items() if "running" not in k
                                                            and "num_batches" not in k)
    summary = json.loads((out / "results.json").read_text())
    assert [r["teachers_at_end"] for r in summary["groups"]] == [[1], [0]]
    params = sum(t.numel() for k, t in want[0].items() if "running" not in k and "num_batches" not in k)
    received = summary["groups"][0]["history"][-1]["bytes/cross_group_received"]
    assert received == 6 * sum(t.numel() * t.element_size() for t in want[0].values())  # 6 steps x 1 peer
    assert summary["groups"][0]["allreduce"]["gradient_bytes"] == 4 * params
    assert "ensemble (mean softmax)" in (out / "summary.md").read_text()
    assert any("all 2 groups finished" in e for e in _events(out))
    print(f"codistill K=1 2x2 gloo run ({parallel}): {seconds:.1f} s")


@pytest.mark.slow  # ~1.5 minutes on the busy 2-core CPU; the weights-mode equality test stays in the default suite
def test_logits_mode_through_files_2x2_equals_two_models_distilling_on_the_shared_batches(tmp_path):
    out = tmp_path / "logits"
    argv = [*FLAGS, "--codistill", "2", "--epochs", "2", "--set", "method_args.exchange=logits",
            "--set", "method_args.shared_batch=4", "--out", str(out)]
    fork = mp.get_context("fork")
    procs = []
    for g in range(2):  # two 2-rank jobs, one per group: each rank exchanges its slice of the shared batch
        port = free_port()
        procs += [fork.Process(target=_as_rank, args=(r, 2, port, [*argv, "--group", str(g)])) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * 4
    cfg = RunConfig.from_dict(json.loads((out / "run.json").read_text())["config"])
    want, plain = _reference(cfg, kd=True, shared_batch=4), _reference(cfg, kd=False)
    for g in range(2):
        got = load_file(out / "exported" / f"group{g}" / "model.safetensors")
        for k in got:
            torch.testing.assert_close(got[k], want[g][k], atol=2e-6, rtol=0,
                                       msg=lambda m, g=g, k=k: f"group {g}: {k}: {m}")
        assert max((want[g][k] - plain[g][k]).abs().max().item() for k in got if k in plain[g]) > 1e-5
    history = json.loads((out / "results.json").read_text())["groups"][0]["history"]
    per_step = 2 * (10 * 4 + 10 * 8 + 4) + 8  # rank 0's 2 images: values, int64 indices, lse; the fingerprint
    assert history[-1]["bytes/cross_group_received"] == 6 * per_step  # 2 epochs x 3 steps


# FSDP2's resume took ~2 minutes on the busy 2-core CPU: the DDP case stays in the default suite.
@pytest.mark.parametrize("parallel", ["ddp", pytest.param("fsdp2", marks=pytest.mark.slow)])
def test_a_2x2_run_killed_after_a_checkpoint_resumes_to_the_same_models(tmp_path, parallel):
    out = tmp_path / parallel
    argv = [*FLAGS, "--codistill", "2", "--exchange-every", "1", "--epochs", "4", "--set", "method_args.via=collective",
            "--set", f"method_args.parallel={parallel}", "--out", str(out)]
    fork, port = mp.get_context("fork"), free_port()
    ranks = [fork.Process(target=_collective_rank, args=(r, port, argv)) for r in range(4)]
    for p in ranks:
        p.start()
    ckpts = [out / "checkpoints" / f"codistill-g{g}.pt" for g in (0, 1)]
    try:  # kill when both groups have checkpointed the same epoch (lockstep keeps them within one)
        t0 = time.monotonic()
        while len(epochs := {torch.load(c, weights_only=True)["epoch"] for c in ckpts if c.exists()}) != 1 \
                or not all(c.exists() for c in ckpts):
            assert all(p.is_alive() for p in ranks) and time.monotonic() - t0 < 90, "no common checkpoint"
            time.sleep(0.005)
    finally:
        for p in ranks:
            p.kill()
            p.join()
    epochs = [torch.load(c, weights_only=True)["epoch"] for c in ckpts]
    assert max(epochs) < 4, "the run ended before it was killed: nothing was resumed"
    resume = (["--resume", str(out), "--no-progress", "--threads", "1"],)
    if epochs[0] != epochs[1]:  # the rare kill between the two groups' saves: refused on every rank, no hang
        with pytest.raises(Exception, match="exited with exit code 2"):
            run_ranks(_collective_rank, resume, nprocs=4, timeout=60)
        pytest.skip(f"killed between the groups' checkpoints ({epochs}); the resume was refused as it must be")
    run_ranks(_collective_rank, resume, nprocs=4, timeout=120)
    cfg = RunConfig.from_dict(json.loads((out / "run.json").read_text())["config"])
    want, plain = _reference(cfg, kd=True), _reference(cfg, kd=False)
    for g in range(2):  # 12 steps: float32 summation-order drift reaches ~2e-6, distillation moves ~1e-3
        got = load_file(out / "exported" / f"group{g}" / "model.safetensors")
        for k in got:
            torch.testing.assert_close(got[k], want[g][k], atol=1e-5, rtol=0,
                                       msg=lambda m, g=g, k=k: f"group {g}: {k}: {m}")
        assert max((want[g][k] - plain[g][k]).abs().max().item() for k in got) > 1e-4
    assert any(e.startswith("group 0 resumes after epoch") for e in _events(out))


def _group(group: int, argv: list[str]) -> mp.Process:
    """Group ``group`` as its own one-rank job (what ``--nproc 2`` starts: one torchrun per group)."""
    proc = mp.get_context("fork").Process(target=_as_rank, args=(0, 1, free_port(), [*argv, "--group", str(group)]))
    proc.start()
    return proc


def _wait_for(path: Path, proc: mp.Process, limit: float) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert proc.is_alive(), f"the group ended (exit code {proc.exitcode}) before it was killed"
        assert time.monotonic() - t0 < limit, f"{path} did not appear within {limit} s"
        time.sleep(0.01)


def test_a_killed_group_does_not_stop_the_other_and_rejoins_with_resume(tmp_path):
    out = tmp_path / "files"
    argv = [*FLAGS, "--codistill", "2", "--exchange-every", "1", "--epochs", "3", "--set", "method_args.wait_s=3",
            "--out", str(out)]
    procs = [_group(g, argv) for g in range(2)]
    try:
        _wait_for(out / "checkpoints" / "codistill-g1.pt", procs[1], 90)
        procs[1].kill()
        procs[1].join()
        procs[0].join(timeout=90)
        assert procs[0].exitcode == 0, f"the surviving group failed (exit code {procs[0].exitcode})"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    events = _events(out)
    assert any("group 0: teacher set shrinks to [] at step" in e and "group 1" in e for e in events)
    assert any("group 0 finished: 3 epochs" in e and "teachers at the end [] of [1]" in e for e in events)
    assert any("the ensemble is written when group(s) [1] finish" in e for e in events)
    killed_at = torch.load(out / "checkpoints" / "codistill-g1.pt", weights_only=True)["epoch"]
    assert killed_at < 3 and not (out / "results.json").exists()
    resumed = _group(1, ["--resume", str(out), "--no-progress", "--threads", "1"])
    resumed.join(timeout=90)
    assert resumed.exitcode == 0
    events = _events(out)
    assert f"group 1 resumes after epoch {killed_at}" in events
    assert any("group 1: group 0 (re)joins the teacher set" in e for e in events)
    summary = json.loads((out / "results.json").read_text())
    assert [r["epochs"] for r in summary["groups"]] == [3, 3]
    assert summary["groups"][1]["resumed_from_epoch"] == killed_at
    assert summary["groups"][1]["teachers_at_end"] == [0]
    assert [h["epoch"] for h in summary["groups"][1]["history"]] == [1, 2, 3]
    from branchify.recipes.codistill_cli import load_ensemble
    from branchify.recipes.train import _loaders, load_exported

    cfg = RunConfig.from_dict(json.loads((out / "run.json").read_text())["config"])
    x, _ = next(iter(_loaders(cfg, torch.device("cpu"))[1]))
    ens = load_ensemble(out)  # the two exported models, mean of their softmax
    members = [load_exported(out / "exported" / f"group{g}") for g in range(2)]
    want = torch.stack([m(x).softmax(-1) for m in members]).mean(0)
    torch.testing.assert_close(ens(x), want)


@pytest.mark.slow
def test_the_launcher_runs_one_torchrun_job_per_group(tmp_path):
    out = tmp_path / "launched"
    cmd = [sys.executable, "-m", "branchify.recipes.cli", *FLAGS, "--codistill", "2", "--nproc", "2", "--epochs", "1",
           "--exchange-every", "2", "--set", "method_args.exchange=weights", "--out", str(out)]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-4000:]
    assert "launched 2 group(s) x 1 processes (one torchrun job per group)" in p.stdout
    assert json.loads((out / "results.json").read_text())["options"]["exchange_every"] == 2


def test_bad_codistillation_launches_fail_before_any_process_starts(tmp_path, capsys):
    assert cli_main([*FLAGS, "--codistill", "2", "--nproc", "3", "--out", str(tmp_path / "a")]) == 2
    assert "--nproc 3 must be a multiple of --codistill 2" in capsys.readouterr().err
    assert cli_main([*FLAGS, "--codistill", "2", "--nproc", "2", "--set", "method_args.exchange=logit",
                     "--out", str(tmp_path / "b")]) == 2
    assert "exchange must be one of ['weights', 'logits'], got 'logit'" in capsys.readouterr().err
    assert cli_main([*FLAGS, "--codistill", "2", "--nproc", "2", "--set", "method_args.models=[resnet20]",
                     "--out", str(tmp_path / "c")]) == 2
    assert "names 1 architectures (['resnet20']) for 2 groups" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abc")


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
