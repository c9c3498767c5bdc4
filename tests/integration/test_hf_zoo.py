"""The architecture spread: 36 Hugging Face architectures from tiny random configs, no tracer hints.

For each: ``bf.method("tsa", model)`` with the default split and ``bf.method("one", model,
split=<2/3 through the layers>)`` - leaf 0 equals the original model at init (eval mode), one
training step gives a finite loss and changes every part's parameters, and the export of a
re-initialised leaf reloads strictly (``save_pretrained`` + ``from_pretrained`` of the original
class with nothing missing or unexpected, strict ``load_state_dict``) and reproduces that leaf.
A subset goes through :func:`branchify_hf` and the wrapper's own export.

Architectures that need a tracer hint are marked ``xfail(strict=True)`` in :data:`XFAIL` with the
hint that fixes them (none at present).
"""
from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import branchify as bf  # noqa: E402
from branchify.integrations.hf import BranchedHFModel, branchify_hf  # noqa: E402
from branchify.integrations.hf.tasks import tie_groups  # noqa: E402
from hf_tiny_models import ZOO, make_zoo_batch, make_zoo_model  # noqa: E402

ATOL = 1e-5

BODY = {
    "bert": "bert.encoder.layer", "roberta": "roberta.encoder.layer", "xlm_roberta": "roberta.encoder.layer",
    "distilbert": "distilbert.transformer.layer", "electra": "electra.encoder.layer",
    "deberta_v2": "deberta.encoder.layer", "mpnet": "mpnet.encoder.layer", "gpt2": "transformer.h",
    "llama": "model.layers", "qwen2": "model.layers", "qwen3": "model.layers", "mistral": "model.layers",
    "gemma": "model.layers", "gemma2": "model.layers", "gpt_neo": "transformer.h", "phi": "model.layers",
    "gpt_neox": "gpt_neox.layers", "opt": "model.decoder.layers",
    "falcon": "transformer.h", "bloom": "transformer.h", "t5": "encoder.block", "bart": "model.encoder.layers",
    "pegasus": "model.encoder.layers", "marian": "model.encoder.layers", "whisper": "model.encoder.layers",
    "vit": "vit.layers", "deit": "deit.layers", "beit": "beit.layers", "dinov2": "dinov2.encoder.layer",
    "swin": "swin.encoder.layers",
    "convnext": "convnext.encoder.stages", "resnet": "resnet.encoder.stages",
    "wav2vec2": "wav2vec2.encoder.layers", "hubert": "hubert.encoder.layers", "wavlm": "wavlm.encoder.layers",
}
"""The stack of layers (or stages) the generic default-split rule finds: it cuts blocks 1 and 2 of 3."""

TWO_THIRDS = {name: f"{body}.2" for name, body in BODY.items()}
TWO_THIRDS.update({"t5": "decoder.block.2", "bart": "model.decoder.layers.2", "pegasus": "model.decoder.layers.2",
                   "marian": "model.decoder.layers.2", "whisper": "model.decoder.layers.2",
                   # ALBERT runs one shared layer 3 times: no split inside the stack; cut after it.
                   "albert": "albert.pooler"})
"""The explicit split 2/3 through the layers (the decoder's, for encoder-decoders)."""

DEFAULT_TSA = {name: [f"{body}.1", f"{body}.2"] for name, body in BODY.items()}
DEFAULT_TSA["albert"] = ["dropout", "classifier"]  # no repeated block: the rule's top-level fallback

XFAIL: dict[tuple[str, str], str] = {
    ("tsa", "marian"): (
        "not a tracing problem: the re-initialised decoder replicas make Marian's fixed sinusoidal position "
        "table (requires_grad=False) trainable (core: build._unfreeze_reinitialised), the step trains it, and "
        "save_pretrained never saves it (_keys_to_ignore_on_save), so from_pretrained rebuilds the sinusoid. "
        "Fix, no tracer hint: re-freeze it after bf.method - for n, p in bm.named_parameters(): "
        "p.requires_grad_(p.requires_grad and not n.endswith('embed_positions.weight')) - or use branchify_hf, "
        "which does (test_branchify_hf_trains_and_saves_the_target[marian-tsa])"),
}
"""(test, architecture) -> why it fails and what fixes it. No architecture needs a tracer hint."""

HF_SUBSET = [("bert", "one", {}), ("deberta_v2", "one", {}), ("llama", "tsa", {}), ("mistral", "one", {}),
             ("t5", "tsa", {}), ("whisper", "one", {}), ("swin", "one", {}), ("wav2vec2", "one", {}),
             ("marian", "tsa", {"split": ["model.encoder.layers.1", "model.encoder.layers.2"]})]
"""(architecture, method, options) also built with branchify_hf and saved with BranchedHFModel.save_target."""


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add synchronisation (several times the runtime on a
    busy machine); restored for the other modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _params(test: str, names) -> list:
    return [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=XFAIL[test, n])) if (test, n) in XFAIL
            else n for n in names]


def _inputs_and_labels(name: str, seed: int = 0) -> tuple[dict, torch.Tensor]:
    batch = make_zoo_batch(name, seed=seed)
    return batch, batch.pop("labels")


def _method(method: str, model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tied embeddings across a cut, never-run modules
        return bf.method(method, model, **kw)


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], p.detach()) for k, p in module.named_parameters())


def _train_step(bm: bf.BranchedModel, okd: bf.OnlineKD, name: str) -> None:
    """One SGD step: a finite loss, and every segment (and the aggregator) with parameters changes."""
    batch, labels = _inputs_and_labels(name, seed=1)
    parts = {key: seg for key, seg in bm.segments.items() if any(True for _ in seg.parameters())}
    if bm.aggregator is not None and any(True for _ in bm.aggregator.parameters()):
        parts["aggregator"] = bm.aggregator
    before = {key: {k: p.detach().clone() for k, p in m.named_parameters()} for key, m in parts.items()}
    opt = torch.optim.SGD(bm.parameters(), lr=0.5)
    okd.set_epoch(1, 2)  # past the start of every ramp: the KD terms weigh in
    bm.train()
    loss = okd(bm(**batch), labels)
    assert torch.isfinite(loss.total), loss.parts
    loss.total.backward()
    opt.step()
    bm.eval()
    unchanged = [key for key, m in parts.items() if not _changed(before[key], m)]
    assert not unchanged, f"no parameter changed in {unchanged}"


def _check_round_trip(bm: bf.BranchedModel, model, name: str, tmp_path) -> None:
    """The last (re-initialised, trained) leaf exports, saves and reloads strictly, and reproduces itself."""
    leaf = bm.num_leaves - 1
    batch = make_zoo_batch(name, labels=False, seed=2)
    with torch.no_grad():
        expected = bm(**batch).logits[leaf]
    exported = bm.export(leaf).eval()
    assert type(exported) is type(model)
    fresh = type(model)(model.config)
    fresh.load_state_dict(bm.export_state_dict(leaf), strict=True)
    exported.save_pretrained(tmp_path)
    reloaded, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info
    with torch.no_grad():
        assert torch.allclose(exported(**batch).logits, expected, atol=ATOL)
        assert torch.allclose(reloaded.eval()(**batch).logits, expected, atol=ATOL)


def _check_leaf0_is_the_model(bm: bf.BranchedModel, model, name: str) -> None:
    batch = make_zoo_batch(name, labels=False)
    with torch.no_grad():
        ref = model(**batch).logits
        out = bm.eval()(**batch)
    assert out.logits[0].shape == ref.shape
    assert torch.allclose(out.logits[0], ref, atol=ATOL)


@pytest.mark.parametrize("name", _params("tsa", ZOO))
def test_tsa_with_the_default_split(name, tmp_path):
    model = make_zoo_model(name)
    bm, okd = _method("tsa", model)
    assert bm.spec.splits == DEFAULT_TSA[name] and bm.split_reason.startswith("default split")
    assert bm.num_leaves == 4
    _check_leaf0_is_the_model(bm, model, name)
    _train_step(bm, okd, name)
    _check_round_trip(bm, model, name, tmp_path)


@pytest.mark.parametrize("name", _params("one", ZOO))
def test_one_split_two_thirds_through(name, tmp_path):
    model = make_zoo_model(name)
    bm, okd = _method("one", model, split=TWO_THIRDS[name])
    assert bm.spec.splits == [TWO_THIRDS[name]] and bm.num_leaves == 3
    # ONE's gate reads the activation at the cut and is sized from it.
    batch = make_zoo_batch(name, labels=False)
    cut = bm(**batch).cuts[()]
    width = bm.aggregator.fc.in_features
    assert width == bm.cut_channels(()) and width in (cut.shape[1], cut.shape[-1]), (width, cut.shape)
    _check_leaf0_is_the_model(bm, model, name)
    _train_step(bm, okd, name)
    _check_round_trip(bm, model, name, tmp_path)


@pytest.mark.parametrize("name, method, options", HF_SUBSET, ids=[f"{n}-{m}" for n, m, _ in HF_SUBSET])
def test_branchify_hf_trains_and_saves_the_target(name, method, options, tmp_path):
    model = make_zoo_model(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = branchify_hf(model, method, **options)
    assert isinstance(wrapped, BranchedHFModel)
    leaf = wrapped.branched.num_leaves - 1
    batch, labels = _inputs_and_labels(name, seed=1)
    wrapped.train()
    wrapped.okd.set_epoch(1, 2)
    out = wrapped(**batch, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    torch.optim.SGD(wrapped.parameters(), lr=0.5).step()
    assert set(wrapped.pop_logged_parts()) >= {"loss/kd", "ce/leaf0"}
    wrapped.eval()
    wrapped.save_target(tmp_path, leaf=leaf)
    reloaded, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info
    inputs = make_zoo_batch(name, labels=False, seed=2)
    with torch.no_grad():
        expected = wrapped.branched(**inputs).logits[leaf]
        assert torch.allclose(reloaded.eval()(**inputs).logits, expected, atol=ATOL)
    # Tied weights stay tied (the cut keeps them one tensor; a name no traced op reads - T5's and
    # Marian's ``shared`` - gets its trained partner's value, not the original's).
    assert getattr(reloaded.config, "tie_word_embeddings", None) == getattr(model.config, "tie_word_embeddings", None)
    sd = reloaded.state_dict()
    for group in tie_groups(model):
        assert all(torch.equal(sd[group[0]], sd[k]) for k in group[1:]), group
