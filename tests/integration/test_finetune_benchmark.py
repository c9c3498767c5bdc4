"""The CPU fine-tuning benchmark (benchmarks/finetune_cpu.py) at a tiny size: pretraining is cached,
every record has the fields the results need, and branchify's DML with pretrained peers starts
and steps exactly like its hand-written twin."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import finetune_cpu as ft
from tests.fashion_mnist import needs_fashion_mnist

pytestmark = needs_fashion_mnist


@pytest.fixture
def ckpt(tmp_path, monkeypatch):
    monkeypatch.setattr(ft, "CACHE", tmp_path / "cache")
    path = ft.pretrain(ft.TINY)
    assert path.stat().st_size < 1e6 and path.with_suffix(".json").exists()
    mtime = path.stat().st_mtime_ns
    assert ft.pretrain(ft.TINY) == path and path.stat().st_mtime_ns == mtime   # cached, not retrained
    return path


def test_tiny_sweep_writes_records_and_summary(tmp_path, ckpt):
    out = tmp_path / "out"
    jobs = [("plain", "pretrained", "plain"), ("dml", "random", "branchify"), ("dml", "pretrained", "branchify"),
            ("dml", "pretrained", "handwritten")]
    ft.sweep(ft.TINY, [0], out, 1, None, ckpt, which=jobs)
    text = ft.write_summary(out, ft.TINY)
    results = json.loads((out / "results.json").read_text())
    assert results["machine"]["torch"] == torch.__version__
    assert sorted((r["method"], r["init"], r["implementation"]) for r in results["runs"]) == sorted(jobs)
    for r in results["runs"]:
        assert r["seed"] == 0 and 0 <= r["target_acc"] <= 100
    dml = {r["implementation"]: r for r in results["runs"] if r["method"] == "dml" and r["init"] == "pretrained"}
    assert dml["branchify"]["leaf_accs"] == dml["handwritten"]["leaf_accs"]   # the twins train identically
    assert "| dml | pretrained | branchify | 1 |" in text and "| dml | pretrained | 1 | +0.00 |" in text


def test_dml_with_pretrained_peers_equals_its_hand_written_twin(ckpt):
    state = torch.load(ckpt, weights_only=True)
    torch.manual_seed(3)
    mine = ft.Trainee(ft.TINY, "dml", "pretrained", "branchify", ckpt)
    torch.manual_seed(3)
    hand = ft.Trainee(ft.TINY, "dml", "pretrained", "handwritten", ckpt)
    for leaf in (0, 1):
        exported, written = mine.model.export(leaf).state_dict(), hand.model[leaf].state_dict()
        assert all(torch.equal(exported[k], written[k]) for k in written)
        assert all(torch.equal(written[k], state[k]) for k in state if not k.startswith("fc."))  # pretrained body
    assert not torch.equal(hand.model[0].fc.weight, hand.model[1].fc.weight)
    x, y = torch.randn(8, 1, 14, 14), torch.arange(8) % 5
    mine.model.train(), hand.model.train()
    assert torch.allclose(mine.loss(x, y), hand.loss(x, y), atol=1e-6)
