"""The Hugging Face fine-tuning benchmark (benchmarks/finetune_hf.py) end to end at a tiny size:
a ViT pretrained with the Trainer and saved with save_pretrained, reloaded with from_pretrained
(fresh classifier, seeded), fine-tuned by the Trainer + BranchifyCallback for every row; the
records, the exported target's class and the paired statistics of the summary."""
from __future__ import annotations

import json
import statistics

import pytest
import torch

from tests.fashion_mnist import needs_fashion_mnist

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from safetensors.torch import load_file  # noqa: E402  (installed with transformers)

from benchmarks import finetune_hf as fh  # noqa: E402
from branchify.integrations.hf import branchify_hf  # noqa: E402

pytestmark = needs_fashion_mnist


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.set_num_threads(1)
    path = fh.pretrain(fh.TINY, fh.checkpoint_dir(fh.TINY, tmp_path_factory.mktemp("out")))
    return path


def test_pretraining_is_saved_small_and_cached(folder):
    config = json.loads((folder / "config.json").read_text())
    info = json.loads((folder / "pretraining.json").read_text())
    assert config["architectures"] == ["ViTModel"] and config["num_channels"] == 1
    assert sum(f.stat().st_size for f in folder.iterdir()) < 2e6
    assert info["train_images"] == 200 and info["test_images"] == 100 and 0 <= info["test_acc_classes_0_4"] <= 100
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert fh.pretrain(fh.TINY, folder) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime   # cached, not retrained


def test_loaded_model_has_the_backbone_and_a_seeded_fresh_head(folder):
    a, b, c = fh.load(folder, 3), fh.load(folder, 3), fh.load(folder, 4)
    saved, backbone = load_file(folder / "model.safetensors"), a.vit.state_dict()   # no pooler, no head
    assert len(saved) == len(backbone)        # transformers 5 renames on load (q_proj...): match by value
    assert all(any(t.shape == v.shape and torch.equal(t, v) for t in backbone.values()) for v in saved.values())
    assert torch.equal(a.classifier.weight, b.classifier.weight)          # same seed: same fresh head
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    assert a.classifier.out_features == 5
    exported = branchify_hf(a, "dml").export_pretrained()                  # automatic pretrained peers
    assert isinstance(exported, transformers.ViTForImageClassification)
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in b.state_dict().items())


def test_tiny_sweep_writes_records_and_summary(folder, tmp_path):
    out = tmp_path / "out"
    fh.sweep(fh.TINY, [0], out, folder)
    text = fh.write_summary(out, fh.TINY, folder)
    results = json.loads((out / "hf_results.json").read_text())
    assert results["machine"]["torch"] == torch.__version__ and results["config"]["name"] == "tiny"
    assert results["pretraining"]["train_images"] == 200
    assert sorted((r["method"], r["init"]) for r in results["runs"]) == sorted(fh.ROWS)
    for r in results["runs"]:
        assert r["implementation"] == "hf-trainer" and r["seed"] == 0 and 0 <= r["target_acc"] <= 100
        assert r["deployed_class"] == "ViTForImageClassification" and r["test_images"] == 100
        if r["method"] == "plain":
            assert r["init_used"] is None
        elif r["init"] == "random":
            assert r["init_used"].startswith("hf:")
        else:
            assert "chosen automatically: loaded with from_pretrained" in r["init_used"]
    assert "| dml | pretrained | 1 |" in text and (out / "hf_summary.md").read_text().strip() == text.strip()


def test_summary_pairs_by_seed():
    accs = {("plain", "pretrained"): [90.0, 91.0, 92.0], ("one", "random"): [90.5, 91.0, 93.0],
            ("one", "pretrained"): [91.0, 91.5, 92.5]}
    records = [{"method": m, "init": i, "seed": s, "target_acc": a, "train_seconds": 2.0,
                "train_cpu_seconds": 1.0}
               for (m, i), v in accs.items() for s, a in enumerate(v)]
    rows = {(r["method"], r["init"]): r for r in fh.summarise(records)}
    gains = [0.5, 0.0, 1.0]
    assert rows[("one", "random")]["gain_mean"] == pytest.approx(0.5)
    assert rows[("one", "random")]["gain_se"] == pytest.approx(statistics.stdev(gains) / 3 ** 0.5)
    assert rows[("one", "pretrained")]["vs_random_mean"] == pytest.approx((0.5 + 0.5 - 0.5) / 3)
    assert rows[("one", "pretrained")]["vs_random_se"] == pytest.approx(statistics.stdev([0.5, 0.5, -0.5]) / 3 ** 0.5)
    plain = rows[("plain", "pretrained")]
    assert plain["target_std"] == pytest.approx(1.0) and "gain_mean" not in plain
    line = "| one | pretrained | 3 | 91.67 ± 0.76 | +0.67 ± 0.17 | +0.17 ± 0.33 | 2 / 1 |"
    assert line in fh.table(list(rows.values()))
