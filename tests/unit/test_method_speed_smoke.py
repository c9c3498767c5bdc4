"""Smoke test of ``benchmarks/method_speed.py`` on a tiny configuration (ResNet-8, batch 2, 8x8)."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import method_speed


def test_every_variant_is_timed_and_measured(tmp_path):
    threads = torch.get_num_threads()
    try:
        payload = method_speed.main(["--batch", "2", "--reps", "1", "--depth", "8", "--size", "8",
                                     "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["variants"].keys() == payload["variants"].keys() == set(method_speed.VARIANTS)
    for name, v in saved["variants"].items():
        assert v["median_ms"] > 0 and v["min_ms"] <= v["median_ms"] <= v["max_ms"], name
        assert len(v["times_ms"]) == 1 and v["saved_mb"] > 0 and v["params_trained"] > 0, name
    r, v = saved["ratios"], saved["variants"]
    assert r["one / one"] == r["one / one paired"] == 1.0
    assert r["kdcl / plain"] == pytest.approx(v["kdcl"]["median_ms"] / v["plain"]["median_ms"])
    # the plain network trains exactly the CIFAR ResNet-8's parameters; KDCL and OKDPH two copies of it
    plain = sum(p.numel() for p in method_speed.network(8).parameters())
    assert v["plain"]["params_trained"] == plain
    assert v["kdcl"]["params_trained"] == v["okdph"]["params_trained"] == 2 * plain
    # the EMA copy is state but not trained; ONE's trained parameters are unchanged by it
    assert v["one+ema-update"]["params_trained"] == v["one"]["params_trained"]
    assert v["one+ema-update"]["state_mb"] > 1.9 * v["one"]["state_mb"]
    assert set(saved["parts_ms"]) == {"ema_update", "ema_teacher_forward", "okdph_hybrid_build_and_forward",
                                      "okdph_fuse_back"}
    assert saved["okdph_fuse_every"] == "1_epoch"
    summary = (tmp_path / "summary.md").read_text()
    for name in method_speed.VARIANTS:
        assert f"| {name} |" in summary
    assert "EMA bookkeeping" in summary and "OKDPH per batch" in summary
