"""A Hugging Face model loaded with from_pretrained gets init="pretrained" automatically.

A tiny BERT is saved with save_pretrained and reloaded with from_pretrained (nothing downloaded):
every replica's weights equal the pretrained ones except the classifier of leaves 1..K-1, and
describe() says so. A model built from the loaded config is not taken for a pretrained one, an
explicit init= wins, and a tied LM head is left tied.
"""
from __future__ import annotations

import pytest
import torch

from tests.hf_tiny_models import make_batch, make_model

transformers = pytest.importorskip("transformers")
from branchify.integrations.hf import branchify_hf  # noqa: E402


@pytest.fixture(scope="module")
def saved_bert(tmp_path_factory):
    net = make_model("bert")
    with torch.no_grad():  # stand-in for pretraining: every weight away from its init
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("bert")
    net.save_pretrained(path)
    return path


def _load(path):
    transformers.logging.set_verbosity_error()
    return transformers.AutoModelForSequenceClassification.from_pretrained(path)


def _diff(a: dict, b: dict) -> list[str]:
    return sorted(k for k in a if not torch.equal(a[k], b[k]))


def test_from_pretrained_bert_keeps_the_pretraining_in_every_replica(saved_bert):
    model = _load(saved_bert)
    sd = model.state_dict()
    hf = branchify_hf(model, "one")
    bm = hf.branched
    assert bm.spec.num_leaves == 3
    assert _diff(sd, bm.export(0).state_dict()) == []
    for leaf in (1, 2):
        assert _diff(sd, bm.export(leaf).state_dict()) == ["classifier.bias", "classifier.weight"]
        w = bm.export(leaf).classifier.weight
        assert abs(w.std().item() - model.config.initializer_range) < 0.01   # BERT's own init: N(0, 0.02)
        assert torch.count_nonzero(bm.export(leaf).classifier.bias) == 0
    text = bm.describe(**{k: v for k, v in make_batch("bert").items() if k != "labels"}, print_fn=None)
    assert "task head ['classifier'] re-initialised in leaves [1, 2] by the model's own _init_weights" in text
    assert f"chosen automatically: loaded with from_pretrained from {str(saved_bert)!r}" in text
    hf.okd.set_epoch(0, 1)
    out = hf(**make_batch("bert"))
    assert torch.isfinite(out.loss)


def test_dml_peer_of_a_from_pretrained_bert(saved_bert):
    model = _load(saved_bert)
    bm = branchify_hf(model, "dml").branched
    assert _diff(model.state_dict(), bm.export(1).state_dict()) == ["classifier.bias", "classifier.weight"]


def test_explicit_init_overrides_the_detection(saved_bert):
    model = _load(saved_bert)
    bm = branchify_hf(model, "one", init="hf").branched
    assert bm.init_used.startswith("hf:")
    changed = _diff(model.state_dict(), bm.export(1).state_dict())
    assert "bert.encoder.layer.2.output.dense.weight" in changed   # the whole replica re-initialised


def test_model_built_from_a_loaded_config_is_not_pretrained(saved_bert):
    config = transformers.AutoConfig.from_pretrained(saved_bert)
    assert config.name_or_path == str(saved_bert)                  # the name travels with the config
    fresh = transformers.AutoModelForSequenceClassification.from_config(config)
    bm = branchify_hf(fresh, "one").branched
    assert bm.init_used.startswith("hf:")


def test_tied_lm_head_stays_tied(tmp_path):
    net = make_model("gpt2_lm")
    net.save_pretrained(tmp_path)
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no parameter of its own"):
        bm = branchify_hf(model, "one").branched
    assert "['lm_head'] is tied to the rest of the network" in bm.init_used
    assert _diff(model.state_dict(), bm.export(1).state_dict()) == []
    noisy = branchify_hf(model, "one", init_noise=0.01).branched
    assert "transformer.h.2.mlp.c_fc.weight" in _diff(model.state_dict(), noisy.export(1).state_dict())
