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
from branchify.integrations.hf import HFTracer, coarse_leaf_paths, default_input_names  # noqa: E402
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
        "import branchify.integrations.hf.plugin  # the entry point needs no transformers\n"
        "try:\n"
        "    from branchify.integrations.hf import branchify_hf\n"
        "except ImportError as e:\n"
        "    assert \"pip install 'branchify[hf]'\" in str(e) and 'branchify_hf' in str(e), e\n"
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


# ---------------------------------------------------------------------- trace constants and input checks
def test_tensor_constants_move_to_the_traced_model():
    """DeBERTa-v2 with log-bucketed relative attention creates tensors while tracing (fx's
    _tensor_constant0...): they live on the GraphModule (following .to(), out of the state_dict),
    not on the temporary wrapper, and the user's model gets no new attribute."""
    from hf_tiny_models import make_zoo_batch, make_zoo_model

    model = make_zoo_model("deberta_v2")
    assert model.config.relative_attention and model.config.position_buckets > 0
    before = set(vars(model))
    gm = bf.trace(model, HFTracer())
    constants = [n.target for n in gm.graph.nodes if n.op == "get_attr" and "tensor_constant" in str(n.target)]
    assert constants and all(isinstance(getattr(gm, c), torch.Tensor) for c in constants)
    assert set(gm.state_dict()) <= set(model.state_dict())
    assert set(vars(model)) == before and not hasattr(model, constants[0])
    batch = make_zoo_batch("deberta_v2", labels=False)
    with torch.no_grad():
        assert torch.allclose(gm(**batch), model(**batch).logits, atol=ATOL)


def test_whisper_length_check_is_kept_as_a_run_time_assertion():
    from hf_tiny_models import make_zoo_batch, make_zoo_model

    model = make_zoo_model("whisper")
    tracer = HFTracer()
    gm = bf.trace(model, tracer)
    assert [g.source for g in tracer.guards] == ["input_features.shape[-1] != expected_seq_length"]
    assert sum(n.target is torch._assert for n in gm.graph.nodes) == 1
    batch = make_zoo_batch("whisper", labels=False)
    with torch.no_grad():
        assert torch.allclose(gm(**batch), model(**batch).logits, atol=ATOL)
    short = dict(batch, input_features=batch["input_features"][..., :-2])
    with pytest.raises(ValueError, match="length 32"):
        model(**short)
    with pytest.raises(AssertionError, match=r"`input_features.shape\[-1\] != expected_seq_length` must be false "
                                             r"\(WhisperEncoder.forward in modeling_whisper.py:\d+\)"):
        gm(**short)
    bm, _ = bf.method("one", model)  # the check survives the cut (it runs in the trunk)
    with pytest.raises(AssertionError, match="input check failed"):
        bm(**short)


def _checked_model(check: str, tmp_path):
    """A tiny HF model whose forward validates its input with ``check`` (source in a real file:
    the tracer reads the check's source)."""
    from transformers import PretrainedConfig, PreTrainedModel

    class CheckedConfig(PretrainedConfig):
        model_type = "branchify-checked-test"

    path = tmp_path / "checked_forward.py"
    path.write_text("def forward(self, input_ids, attention_mask=None, **kwargs):\n"
                    f"    {check}\n"
                    "    return (self.head(self.embed(input_ids).mean(1)),)\n")
    namespace: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), {}, namespace)

    class Checked(PreTrainedModel):
        config_class = CheckedConfig
        forward = namespace["forward"]

        def __init__(self, config):
            super().__init__(config)
            self.embed = nn.Embedding(16, 8)
            self.head = nn.Linear(8, 2)
            self.post_init()

    return Checked(CheckedConfig())


@pytest.mark.parametrize("check, bad_length, asserts", [
    ("if input_ids.shape[-1] > 6: raise ValueError('too long')", 7, 1),
    ("if not input_ids.shape[-1] <= 6: raise ValueError('too long')", 7, 1),
    ("assert input_ids.shape[-1] <= 6, 'too long'", 7, 1),
    ("if input_ids.shape[-1] < 2 or input_ids.shape[-1] > 6: raise ValueError('bad length')", 1, 2),  # one each
    ("if input_ids.shape[-1] <= 6:\n        pass\n    else:\n        raise ValueError('too long')", 7, 1),
], ids=["if-raise", "if-not-raise", "assert", "or", "else-raise"])
def test_input_checks_pass_when_tracing_and_run_at_run_time(check, bad_length, asserts, tmp_path):
    """The check's non-raising branch is traced; the condition is asserted at run time."""
    model = _checked_model(check, tmp_path).eval()
    tracer = HFTracer(input_names=["input_ids"])
    gm = bf.trace(model, tracer)
    assert len(tracer.guards) == asserts == sum(n.target is torch._assert for n in gm.graph.nodes)
    ids = torch.randint(0, 16, (2, 4))
    assert torch.allclose(gm(ids), model(input_ids=ids)[0], atol=ATOL)
    bad = torch.randint(0, 16, (2, bad_length))
    with pytest.raises((ValueError, AssertionError)):
        model(input_ids=bad)
    with pytest.raises(AssertionError, match="input check failed"):
        gm(bad)


def test_control_flow_that_is_not_a_plain_check_still_fails_with_the_fix(tmp_path):
    """``if a and b: raise`` is decided by both operands: not assumed, reported as before."""
    model = _checked_model("if input_ids.shape[-1] > 6 and input_ids.shape[0] > 1: raise ValueError('x')",
                           tmp_path)
    with pytest.raises(bf.TraceError, match="control flow") as info:
        bf.trace(model, HFTracer(input_names=["input_ids"]))
    assert "HFTracer(" in str(info.value)


def test_package_exports_and_entry_point():
    """The public names resolve lazily from the package; the plugin is found through its entry point."""
    from importlib.metadata import entry_points

    import branchify.integrations.hf as hf
    from branchify.integrations.hf import plugin, tracer, wrapper
    from branchify.registry import plugin_for

    assert hf.HFTracer is tracer.HFTracer and hf.BranchedHFModel is wrapper.BranchedHFModel
    assert {n: getattr(hf, n) is not None for n in hf.__all__} == {n: True for n in hf.__all__}
    with pytest.raises(AttributeError, match="has no attribute 'branchify_hff'; it exports"):
        hf.branchify_hff
    values = [ep.value for ep in entry_points(group="branchify.plugins") if ep.name == "transformers"]
    assert values == ["branchify.integrations.hf.plugin:PLUGIN"]
    assert plugin_for(make_model("bert")) is plugin.PLUGIN
