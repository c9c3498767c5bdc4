"""branchify-train's reliability, for real: a CLI run killed (SIGKILL) after its first checkpoint
and resumed ends bitwise equal to an uninterrupted run on the CPU; results are written as each run
finishes; an existing run directory is never truncated; bad checkpoints and typos fail with
clear messages before anything trains."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from branchify.recipes.checkpoint import CheckpointError, checkpoint_path, load_checkpoint
from branchify.recipes.cli import main as cli_main
from branchify.recipes.config import RunConfig

METHODS = ["baseline", "one"]
EPOCHS = 4
FLAGS = ["--dataset", "fashion_mnist", "--model", "resnet20", "--methods", ",".join(METHODS), "--fake-data",
         "--epochs", str(EPOCHS), "--batch-size", "8", "--set", "fake_batches=3", "--device", "cpu",
         "--no-progress"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "branchify.recipes.cli", "--threads", "1", "--no-plots", *args]


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=ENV)


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, f"{proc.args} failed ({proc.returncode}):\n{log.read_text()[-3000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run, and the same run killed after one's first checkpoint, then resumed."""
    root = tmp_path_factory.mktemp("resume")
    full, killed = root / "full", root / "killed"
    t0 = time.monotonic()
    p_full = _start(_cli(*FLAGS, "--out", str(full)), root / "full.log")
    p_kill = _start(_cli(*FLAGS, "--out", str(killed)), root / "killed.log")
    first = checkpoint_path(killed, "one", 0)
    try:
        while not first.exists():
            assert p_kill.poll() is None, f"the run ended before it was killed:\n{(root / 'killed.log').read_text()}"
            assert time.monotonic() - t0 < 240, "no checkpoint appeared within 240 s"
            time.sleep(0.005)
        os.kill(p_kill.pid, signal.SIGKILL)
    finally:
        p_kill.kill()
        p_kill.wait()
    at_kill = SimpleNamespace(epoch=torch.load(first, weights_only=True)["epoch"],
                              results=json.loads((killed / "results.json").read_text()),
                              log=(killed / "log.jsonl").read_text())
    p_res = _start(_cli("--resume", str(killed)), root / "resume.log")
    _finish(p_res, root / "resume.log")
    _finish(p_full, root / "full.log")
    return SimpleNamespace(full=full, killed=killed, at_kill=at_kill, seconds=time.monotonic() - t0)


def _assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


def test_a_killed_run_resumed_ends_bitwise_equal_to_an_uninterrupted_one(runs):
    assert 1 <= runs.at_kill.epoch < EPOCHS  # killed mid-run, so the resume had work to do
    for m in METHODS:
        _assert_same_tensors(load_file(runs.full / "exported" / f"{m}-seed0" / "model.safetensors"),
                             load_file(runs.killed / "exported" / f"{m}-seed0" / "model.safetensors"),
                             f"exported {m}")
        a = torch.load(checkpoint_path(runs.full, m, 0), weights_only=True)
        b = torch.load(checkpoint_path(runs.killed, m, 0), weights_only=True)
        assert a["epoch"] == b["epoch"] == EPOCHS
        _assert_same_tensors(a["model"], b["model"], f"{m} model state")
        for i, state in a["optimizer"]["state"].items():
            assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"])
        assert a["scheduler"] == b["scheduler"] and a["okd"] == b["okd"]
        strip = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in json.loads(a["history"])]
        assert strip == [{k: v for k, v in r.items() if k != "elapsed_s"} for r in json.loads(b["history"])]
    assert any(k.startswith("aggregator.") for k in a["model"])  # ONE's gate was saved and restored
    print(f"resume test: 3 CLI processes in {runs.seconds:.1f} s")


def test_results_are_written_per_run_and_the_log_is_only_appended(runs):
    assert [r["config"]["method"] for r in runs.at_kill.results["runs"]] == ["baseline"]
    assert "| baseline |" in (runs.full / "summary.md").read_text()
    final = json.loads((runs.killed / "results.json").read_text())
    assert [r["config"]["method"] for r in final["runs"]] == METHODS
    assert [r["resumed_from_epoch"] for r in final["runs"]] == [EPOCHS, runs.at_kill.epoch]
    log = (runs.killed / "log.jsonl").read_text()
    assert log.startswith(runs.at_kill.log)  # nothing written before the kill was lost
    events = [json.loads(line) for line in log.splitlines() if '"event"' in line]
    assert [(e["method"], e["from_epoch"]) for e in events] == [("baseline", EPOCHS), ("one", runs.at_kill.epoch)]


def test_an_existing_run_directory_is_refused_untouched(runs, capsys, one_thread):
    before = (runs.full / "log.jsonl").read_bytes()
    assert cli_main([*FLAGS, "--out", str(runs.full)]) == 2
    err = capsys.readouterr().err
    assert f"--resume {runs.full}" in err and "fresh --out folder" in err
    assert (runs.full / "log.jsonl").read_bytes() == before


def test_resume_refuses_flags_that_change_the_run(runs, capsys, one_thread):
    assert cli_main(["--resume", str(runs.full), "--epochs", "5", "--no-progress"]) == 2
    assert f"epochs: {EPOCHS} (run) vs 5 (now)" in capsys.readouterr().err


def _copy(runs, tmp_path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(runs.full, out)
    return out


def test_a_truncated_checkpoint_is_named_and_nothing_resumes(runs, tmp_path, capsys, one_thread):
    out = _copy(runs, tmp_path)
    path = checkpoint_path(out, "baseline", 0)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert cli_main(["--resume", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {path} cannot be read" in err and "truncated" in err


def test_a_checkpoint_of_another_method_is_refused_with_the_difference(runs, tmp_path, capsys, one_thread):
    out = _copy(runs, tmp_path)
    shutil.copy(checkpoint_path(out, "one", 0), checkpoint_path(out, "baseline", 0))
    assert cli_main(["--resume", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(checkpoint_path(out, "baseline", 0)) in err and "method: 'one' (checkpoint) vs 'baseline' (now)" in err


def test_incomplete_or_pickled_checkpoints_are_refused(runs, tmp_path):
    cfg = RunConfig.from_dict(json.loads((runs.full / "run.json").read_text())["config"]).replace(method="one")
    payload = torch.load(checkpoint_path(runs.full, "one", 0), weights_only=True)
    partial = tmp_path / "partial.pt"
    torch.save({k: v for k, v in payload.items() if k not in ("optimizer", "rng")}, partial)
    with pytest.raises(CheckpointError, match=r"partial\.pt lacks \['optimizer', 'rng'\]"):
        load_checkpoint(partial, cfg)
    pickled = tmp_path / "pickled.pt"
    torch.save({**payload, "history": SimpleNamespace(evil=True)}, pickled)  # an arbitrary object
    with pytest.raises(CheckpointError, match=r"pickled\.pt cannot be read"):
        load_checkpoint(pickled, cfg)
    assert load_checkpoint(checkpoint_path(runs.full, "one", 0), cfg)["epoch"] == EPOCHS


@pytest.mark.parametrize("flags, message", [
    (["--methods", "baseline,onee"], "unknown method 'onee'; did you mean 'one'?"),
    (["--methods", "baseline,one", "--model", "resnet2"], "unknown model 'resnet2'; did you mean 'resnet32'"),
    (["--methods", "baseline,one", "--set", "method_args.brnaches=4"], "does not take ['brnaches']; did you mean 'branches'"),
    (["--methods", "one", "--set", "epoch=3"], "'epoch': did you mean 'epochs'?"),
])
def test_typos_fail_before_anything_trains(flags, message, tmp_path, capsys, one_thread):
    t0 = time.monotonic()
    assert cli_main(["--dataset", "fashion_mnist", "--fake-data", "--device", "cpu", *flags,
                     "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing was written, so nothing trained
    assert time.monotonic() - t0 < 30
