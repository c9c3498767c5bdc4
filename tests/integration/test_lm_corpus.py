"""benchmarks/lm_corpus.py end to end at a tiny size: the stdlib corpus split, one training run per
kind (plain and branched through the HF wrapper, exported), and the paired summary."""
import argparse
import json
import math

import pytest

pytest.importorskip("transformers")
lm_corpus = pytest.importorskip("benchmarks.lm_corpus")


def _args(**kw):
    base = dict(steps=3, batch=2, seq=32, hidden=32, layers=3, lr=3e-3, max_files=30)
    return argparse.Namespace(**{**base, **kw})


def test_corpus_split_is_by_file_and_deterministic():
    train, val, info = lm_corpus.corpus(max_files=30)
    again = lm_corpus.corpus(max_files=30)[2]
    assert info["sha1"] == again["sha1"] and info["files"] == 30
    assert 0 < info["val_files"] < 30
    assert train.numel() == info["train_bytes"] and val.numel() == info["val_bytes"]
    assert int((train == 0).sum()) == 30 - info["val_files"]  # one NUL after each training file


@pytest.mark.parametrize("method", ["baseline", "one"])
def test_one_run_trains_exports_and_scores(method):
    result = lm_corpus.train_one(method, 0, _args())
    assert math.isfinite(result["val_ppl"]) and 1 < result["val_ppl"] < 1000
    assert result["method"] == method and result["corpus"]["files"] == 30


def test_summary_pairs_seeds():
    runs = [{"method": m, "seed": s, "val_ppl": v} for m, s, v in [
        ("baseline", 0, 10.0), ("baseline", 1, 12.0), ("one", 0, 9.0), ("one", 1, 11.5)]]
    s = lm_corpus.summarise(runs)
    assert s["baseline"]["mean_ppl"] == 11.0 and "diff_vs_baseline" not in s["baseline"]
    assert s["one"]["diff_vs_baseline"] == pytest.approx(-0.75)
    assert s["one"]["se"] == pytest.approx(abs(-1.0 - -0.5) / math.sqrt(2) / math.sqrt(2))
    assert s["one"]["per_seed"] == [9.0, 11.5] and s["one"]["paired_seeds"] == 2
    table = lm_corpus.markdown(s)
    assert "| one | 2 | 10.250 ± 1.768 | -0.750 ± 0.250 | 9.000, 11.500 |" in table


def test_a_finished_run_with_other_settings_is_refused_not_mixed_in(tmp_path):
    args = _args()
    (tmp_path / "runs").mkdir()
    stale = {**lm_corpus._config(args), "steps": args.steps + 1}
    (tmp_path / "runs" / "one-seed0.json").write_text(json.dumps({"config": stale}))
    with pytest.raises(ValueError, match="was trained with .* delete it or pass another --out"):
        lm_corpus._job("one", 0, args, tmp_path)
    (tmp_path / "runs" / "one-seed0.json").write_text(json.dumps({"config": lm_corpus._config(args)}))
    assert lm_corpus._job("one", 0, args, tmp_path) is None  # same settings: reused, nothing started
