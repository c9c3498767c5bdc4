"""The HF recipes in their offline smoke modes (tiny data, a few Trainer steps)."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def test_hf_text_classify_fake_data(tmp_path):
    from branchify.recipes.hf_text import main

    rows = main(["classify", "--fake-data", "--methods", "baseline,one", "--max-steps", "2",
                 "--out", str(tmp_path)])
    assert [r["method"] for r in rows] == ["baseline", "one"]
    assert rows[1]["leaves"] == 3 and rows[1]["deployed_params"] == rows[0]["deployed_params"]
    assert rows[1]["replica_init"].startswith("pretrained:")           # loaded with from_pretrained
    assert "task head ['classifier'] re-initialised in leaves [1, 2]" in rows[1]["replica_init"]
    assert (tmp_path / "classify" / "one" / "exported-target" / "config.json").is_file()
    saved = json.loads((tmp_path / "classify" / "results.json").read_text())
    assert len(saved["rows"]) == 2


def test_hf_text_translate_fake_data(tmp_path):
    from branchify.recipes.hf_text import main

    rows = main(["translate", "--fake-data", "--methods", "tsa", "--max-steps", "2", "--out", str(tmp_path)])
    assert rows[0]["leaves"] == 4 and 0.0 <= rows[0]["accuracy"] <= 1.0
    assert "is tied to the rest of the network" in rows[0]["replica_init"]    # Marian's tied LM head
    assert (tmp_path / "translate" / "tsa" / "exported-target" / "branchify.json").is_file()


def test_hf_vit_fashion_mnist_smoke(tmp_path):
    from branchify.recipes.data import find_fashion_mnist
    from branchify.recipes.hf_vit_fashion_mnist import main

    try:
        find_fashion_mnist()
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST is not installed (scripts/setup.sh installs it)")
    rows = main(["--smoke", "--methods", "baseline,one", "--out", str(tmp_path)])
    base, one = rows
    assert one["deployed_params"] == base["deployed_params"] < one["trained_params"]
    # The reloaded export scores what the Trainer measured on the branched model's target.
    assert one["target_accuracy"] == pytest.approx(one["trainer_accuracy"])
    assert (tmp_path / "results.json").is_file()


def test_hf_vit_fashion_mnist_from_a_pretrained_vit(tmp_path):
    from branchify.recipes.data import find_fashion_mnist
    from branchify.recipes.hf_vit_fashion_mnist import main, make_vit

    try:
        find_fashion_mnist()
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST is not installed (scripts/setup.sh installs it)")
    make_vit(seed=1).save_pretrained(tmp_path / "vit")
    rows = main(["--smoke", "--methods", "dml", "--pretrained", str(tmp_path / "vit"), "--out", str(tmp_path)])
    assert rows[0]["replica_init"].startswith("pretrained:")
    assert "task head ['classifier'] re-initialised in leaves [1]" in rows[0]["replica_init"]
