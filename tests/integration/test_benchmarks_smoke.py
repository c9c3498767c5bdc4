"""The speed benchmarks run end to end at toy size and write the results they promise.

Timings at this size mean nothing; what is checked is that every variant runs, that the ratios
the performance contract asks for are computed from the right pairs, and that the JSON carries
the machine description the README quotes.
"""
from __future__ import annotations

import json

import pytest

from benchmarks import speed, step_overhead


pytestmark = pytest.mark.usefixtures("one_thread")


def test_speed_benchmark_writes_every_variant_and_the_contract_ratios(tmp_path):
    out = tmp_path / "speed.json"
    payload = speed.main(["--batch", "4", "--reps", "1", "--warmup", "0", "--trees", "ONE", "AHBF",
                          "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["machine"]["device"] == "cpu" and saved["batched_auto_form"] == "loop"
    res = saved["runs"][0]["results"]
    # AHBF's deepened leaves differ in structure, so it has no batched form
    assert set(res) == {"plain plain", "ONE hand", "ONE loop", "ONE batched", "AHBF hand", "AHBF loop"}
    assert all(v["median_ms"] > 0 and v["saved_mb"] > 0 for v in res.values())
    assert res["ONE loop"]["params"] == res["ONE hand"]["params"] == res["ONE batched"]["params"]
    r = saved["runs"][0]["ratios"]
    assert r["ONE: loop / hand"] == pytest.approx(res["ONE loop"]["median_ms"] / res["ONE hand"]["median_ms"])
    assert r["ONE: branchify (auto=loop) / hand"] == r["ONE: loop / hand"]  # CPU default: the loop
    assert r["ONE: batched / loop"] == pytest.approx(res["ONE batched"]["median_ms"] / res["ONE loop"]["median_ms"])
    assert "AHBF: batched / loop" not in r
    assert payload["runs"][0]["batch"] == 4


def test_step_overhead_benchmark_writes_ratios(tmp_path):
    out = tmp_path / "overhead.json"
    step_overhead.main(["--batch", "4", "--reps", "1", "--warmup", "0", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["machine"]["device"] == "cpu"
    assert set(saved["branchify_over_hand"]) == {"ONE-3", "TSA-2-3"}
    assert all(v > 0 for v in saved["branchify_over_hand"].values())
