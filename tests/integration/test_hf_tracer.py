"""The coarse Hugging Face tracer: tracing, cutting, padding masks in every branch, export, errors."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import branchify as bf

pytest.importorskip("transformers")

from branchify.integrations.hf import BranchedHFModel  # noqa: E402
from branchify.integrations.hf_tracer import HFTracer, coarse_leaf_paths, default_input_names  # noqa: E402
from branchify.online_kd import OnlineKD  # noqa: E402
from hf_tiny_models import FAMILIES, SPLITS, make_batch, make_model  # noqa: E402

ATOL = 1e-5


def _branch(model: nn.Module, family: str, fanout: int = 3, init: str = "auto") -> bf.BranchedModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tied embeddings across the cut (GPT-2 LM, T5, Marian) warn
        return bf.branchify(model, bf.Spec(splits=[SPLITS[family]], fanout=[fanout], init=init))


@pytest.mark.parametrize("family", FAMILIES)
def test_trace_branch_export(family):
    """Traced graph == model; leaf 0 == model; every leaf exports to the original class exactly."""
    model = make_model(family).eval()
    batch = make_batch(family, labels=False)
    ref = model(**batch).logits
    points = bf.split_points(model)
    assert SPLITS[family] in points
    assert not any(p.startswith("hf_model") for p in points)  # the wrapper prefix is stripped

    gm = bf.trace(model, HFTracer())
    assert torch.allclose(gm(**batch), ref, atol=ATOL)
    # Qualified names are the original ones: the graph's parameters are state_dict keys.
    assert set(gm.state_dict()) <= set(model.state_dict())

    bm = _branch(model, family).eval()
    out = bm(**batch)
    assert out.num_leaves == 3
    assert torch.allclose(out.logits[0], ref, atol=ATOL)
    assert not torch.allclose(out.logits[1], ref, atol=1e-3)  # replicas are re-initialised
    for leaf in range(3):
        exported = bm.export(leaf).eval()
        assert type(exported) is type(model)
        assert torch.allclose(exported(**batch).logits, out.logits[leaf], atol=ATOL)
    # The user's model is untouched.
    assert torch.allclose(model(**batch).logits, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_penultimate_features(family):
    """Features are the final Linear's input: hidden-size wide, per example or per token."""
    model = make_model(family).eval()
    bm = _branch(model, family, fanout=2)
    out = bm(**make_batch(family, labels=False))
    assert bm.feature_dim == 32
    for f in out.features:
        assert f is not None and f.shape[-1] == 32
    per_token = family in ("gpt2_lm", "gpt2_cls", "t5", "marian")
    assert out.features[0].dim() == (3 if per_token else 2)


def _pad_sensitive_batch(family):
    """A batch with padding that the model would see if the mask were dropped (left pad for GPT-2)."""
    batch = make_batch(family, labels=False, pad_from=5)
    if family.startswith("gpt2"):  # causal: right pads are never attended, so pad on the left
        ids, mask = batch["input_ids"], batch["attention_mask"]
        ids[-1] = torch.roll(ids[-1], 3)
        mask[-1] = torch.roll(mask[-1], 3)
    return batch


def _real_positions(family, batch, logits):
    """Outputs that must not depend on padded tokens."""
    if family == "gpt2_lm":
        return logits[batch["attention_mask"].bool()]
    return logits


@pytest.mark.parametrize("family", ["bert", "distilbert", "gpt2_lm", "gpt2_cls", "t5", "marian"])
def test_padding_mask_in_every_branch(family):
    """Changing padded tokens changes no leaf's output; without the mask it would."""
    model = make_model(family).eval()
    bm = _branch(model, family, fanout=3).eval()
    batch = _pad_sensitive_batch(family)
    pads = batch["attention_mask"] == 0
    assert pads.any()
    other = dict(batch, input_ids=batch["input_ids"].masked_fill(pads, 7))
    ones = torch.ones_like(batch["attention_mask"])
    with torch.no_grad():
        a, b = bm(**batch), bm(**other)
        c, d = bm(**dict(batch, attention_mask=ones)), bm(**dict(other, attention_mask=ones))
    for leaf in range(3):
        masked = (_real_positions(family, batch, a.logits[leaf])
                  - _real_positions(family, batch, b.logits[leaf])).abs().max().item()
        unmasked = (_real_positions(family, batch, c.logits[leaf])
                    - _real_positions(family, batch, d.logits[leaf])).abs().max().item()
        assert masked <= 1e-6, f"leaf {leaf} sees padded tokens (change {masked:.2e})"
        # The check is sensitive: with an all-ones mask the same change does reach the outputs.
        assert unmasked > 100 * max(masked, 1e-8), (leaf, masked, unmasked)


def test_config_is_a_constant_not_rebuilt():
    """The config reaches the mask builder by reference, private fields included."""
    model = make_model("bert")
    gm = bf.trace(model, HFTracer())
    configs = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.endswith("config")]
    assert configs, "the mask builder must read the config through get_attr"
    for n in configs:
        obj = gm
        for part in n.target.split("."):
            obj = getattr(obj, part)
        assert obj is model.config  # the same object, never a rebuilt copy
    assert not any(n.op == "call_function" and isinstance(n.target, type) and "Config" in n.target.__name__
                   for n in gm.graph.nodes)
    assert gm.config._attn_implementation == model.config._attn_implementation


def test_crossing_values_reach_branches():
    """The attention mask built in the trunk is an input of every branch (env-dict design)."""
    bm = _branch(make_model("bert"), "bert")
    assert any("mask" in name for name in bm.layout.level_inputs[1])
    bm = _branch(make_model("t5"), "t5")
    names = bm.layout.level_inputs[1]
    assert sum("mask" in n for n in names) >= 2  # decoder causal mask and encoder padding mask
    assert any("encoder" in n for n in names)     # the encoder's output feeds the decoder branches


def test_defaults_and_shapes():
    """Leaving out the attention mask means no padding; one trace serves every batch/sequence size."""
    model = make_model("gpt2_lm").eval()
    assert default_input_names(model) == ["input_ids", "attention_mask"]
    assert default_input_names(make_model("bert"))[:3] == ["input_ids", "attention_mask", "token_type_ids"]
    bm = _branch(model, "gpt2_lm").eval()
    for b, s in ((1, 5), (3, 11)):
        ids = torch.randint(2, 64, (b, s))
        assert torch.allclose(bm(ids).logits[0], model(input_ids=ids).logits, atol=ATOL)


def test_dropout_follows_train_eval():
    """Functional dropout in the traced root code follows .train()/.eval() (Marian's embeddings)."""
    model = make_model("marian")
    model.config.dropout = 0.5
    model.model.encoder.dropout = model.model.decoder.dropout = 0.5
    gm = bf.trace(model, HFTracer())
    batch = make_batch("marian", labels=False)
    gm.eval()
    assert torch.equal(gm(**batch), gm(**batch))
    gm.train()
    assert not torch.allclose(gm(**batch), gm(**batch))


def test_coarse_leaves():
    assert coarse_leaf_paths(make_model("bert"))[:2] == ["bert.embeddings", "bert.encoder.layer.0"]
    leaves = coarse_leaf_paths(make_model("marian"))
    assert "model.decoder.layers.2" in leaves and "model.encoder.embed_positions" in leaves


# ---------------------------------------------------------------------- untraceable custom model
def _router_model():
    from transformers import PretrainedConfig, PreTrainedModel

    class RouterConfig(PretrainedConfig):
        model_type = "branchify-router-test"

        def __init__(self, hidden=16, layers=3, vocab=32, num_labels=3, **kw):
            self.hidden, self.layers, self.vocab = hidden, layers, vocab
            super().__init__(num_labels=num_labels, **kw)

    class Router(nn.Module):
        """Data-dependent Python control flow: not symbolically traceable."""

        def __init__(self, hidden):
            super().__init__()
            self.proj = nn.Linear(hidden, hidden)

        def forward(self, x):
            if x.mean() > 0:
                return self.proj(x)
            return x

    class RouterModel(PreTrainedModel):
        config_class = RouterConfig

        def __init__(self, config):
            super().__init__(config)
            self.embed = nn.Embedding(config.vocab, config.hidden)
            self.router = Router(config.hidden)
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(config.hidden, config.hidden), nn.GELU())
                                        for _ in range(config.layers))
            self.head = nn.Linear(config.hidden, config.num_labels)
            self.post_init()

        def forward(self, input_ids, attention_mask=None, **kwargs):
            h = self.router(self.embed(input_ids))
            for blk in self.blocks:
                h = h + blk(h)
            return (self.head(h.mean(1)),)

    torch.manual_seed(0)
    return RouterModel(RouterConfig())


def test_untraceable_custom_model_names_layer_and_fix():
    model = _router_model()
    spec = bf.Spec(splits=["blocks.1"], fanout=[2])
    with pytest.raises(bf.TraceError) as info:
        bf.branchify(model, spec)
    msg = str(info.value)
    assert "'router'" in msg and "Router" in msg
    assert "HFTracer(leaf_modules=['router'])" in msg
    assert "x.mean() > 0" in msg or "control flow" in msg
    # The fix the message gives works.
    bm = bf.branchify(model, spec, tracer=HFTracer(leaf_modules=["router"])).eval()
    ids = torch.randint(0, 32, (2, 5))
    assert torch.allclose(bm(ids).logits[0], model.eval()(ids)[0], atol=ATOL)


def test_wrapper_rejects_inputs_it_was_not_traced_with():
    model = make_model("distilbert")
    bm = _branch(model, "distilbert")
    wrapped = BranchedHFModel(bm, OnlineKD(bm), model)
    with pytest.raises(TypeError, match="token_type_ids"):
        wrapped(input_ids=torch.ones(2, 4, dtype=torch.long), token_type_ids=torch.zeros(2, 4, dtype=torch.long))


def test_import_branchify_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import torch, branchify as bf, branchify.integrations\n"
        "net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))\n"
        "bm = bf.branchify(net, bf.Spec(splits=['2'], fanout=[2]))\n"
        "assert bm(torch.randn(2, 4)).num_leaves == 2\n"
        "assert 'transformers' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "try:\n"
        "    import branchify.integrations.hf\n"
        "except ImportError as e:\n"
        "    assert 'pip install' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('expected ImportError')\n"
        "print('ok')\n"
    )
    env = dict(os.environ)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("ok")


def test_bf_method_one_on_bert_sizes_the_gate_from_the_layer_after_the_cut():
    """DESIGN's journey: bf.method("one", BertForSequenceClassification(cfg), split=...)."""
    import branchify as bf
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                     intermediate_size=64, num_labels=3)
    model, okd = bf.method("one", BertForSequenceClassification(cfg), split="bert.encoder.layer.1")
    assert model.cut_channels(()) == 32
    okd.set_epoch(0, 3)
    out = model(input_ids=torch.randint(0, 100, (4, 8)), attention_mask=torch.ones(4, 8, dtype=torch.long))
    loss = okd(out, torch.randint(0, 3, (4,)))
    loss.total.backward()
    assert torch.isfinite(loss.total) and model.aggregator.fc.weight.grad is not None
