"""Token-chunked CE and KD terms (branchify.token_chunks): equal to the unchunked loss and its
gradients in float64, mask-aware, chosen automatically only for large token-level outputs."""
import pytest
import torch
from token_chunk_inputs import _labels, _leaves

from branchify import token_chunks
from branchify.functional import cross_entropy, kl_div_logits, valid_mask
from branchify.token_chunks import (
    ChunkedTokenLoss,
    TokenChunkError,
    check_token_chunk,
    chunked_terms,
    count_distinct,
    resolve_chunk,
)

RTOL, ATOL = 1e-10, 1e-13


def _values_and_grads(z, w, y, T, chunk):
    """Every term of a ONE-like + DML-like loss (a teacher mixing the leaves, detached and not), the
    weighted total's gradients w.r.t. the leaves and the teacher's mixing weights."""
    teacher = sum(w[k] * zk for k, zk in enumerate(z))
    kd = [(teacher, z[0], True), (teacher, z[1], False), (z[1], z[0], True), (z[0], z[2], False)]
    if chunk is None:
        mask = valid_mask(y, z[0])
        values = [cross_entropy(v, y) for v in [*z, teacher]]
        values += [kl_div_logits(t.detach() if d else t, s, T, mask) for t, s, d in kd]
    else:
        r = chunked_terms(z, [teacher], kd, y, temperature=T, chunk=chunk)
        values = r.ce + r.kd
    coef = torch.linspace(0.5, 2.0, len(values), dtype=torch.float64)  # distinct weight per term
    total = sum(c * v for c, v in zip(coef, values))
    return torch.stack([v.detach() for v in values]), torch.autograd.grad(total, [*z, w])


@pytest.mark.parametrize("chunk", [1, 3, 5, 7, 15, 100])  # in-row chunks, whole rows, row groups
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_terms_equal_unchunked_values_and_gradients(chunk, T):
    z, y = _leaves(), _labels()
    w = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64, requires_grad=True)
    ref, ref_grads = _values_and_grads(z, w, y, T, None)
    got, got_grads = _values_and_grads(z, w, y, T, chunk)
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=RTOL, atol=ATOL)


def test_padding_gets_no_gradient_and_all_padding_gives_zero():
    z, y = _leaves(k=2), _labels()
    r = chunked_terms(z, [], [(z[1], z[0], False)], y, temperature=2.0, chunk=2)
    sum(r.ce + r.kd).backward()
    for zk in z:
        assert zk.grad[y == -100].abs().sum() == 0 and zk.grad[y != -100].abs().sum() > 0
    none = torch.full_like(y, -100)
    r = chunked_terms(z, [], [(z[1], z[0], False)], none, temperature=2.0, chunk=2)
    assert [float(v.detach()) for v in r.ce + r.kd] == [0.0, 0.0, 0.0]  # as the unchunked masked mean


def test_half_precision_logits_get_gradients_of_their_dtype():
    z = [t.detach().to(torch.bfloat16).requires_grad_() for t in _leaves(k=2)]
    y = _labels()
    r = chunked_terms(z, [], [(z[1], z[0], True)], y, temperature=3.0, chunk=4)
    assert r.ce[0].dtype == torch.float32
    sum(r.ce + r.kd).backward()
    ref = cross_entropy(z[0].detach().float(), y) + kl_div_logits(z[1].detach().float(), z[0].detach().float(), 3.0,
                                                                  valid_mask(y, z[0]))
    torch.testing.assert_close(r.ce[0] + r.kd[0], ref, rtol=1e-5, atol=1e-6)
    assert z[0].grad.dtype == torch.bfloat16 and torch.isfinite(z[0].grad.float()).all()


def test_auto_selection_threshold(monkeypatch):
    tokens = torch.zeros(1, 4096, dtype=torch.long)
    assert resolve_chunk("auto", tokens, 152064, 4) == token_chunks.AUTO_CHUNK_ELEMENTS // (152064 * 4)
    small = torch.zeros(2, 16, dtype=torch.long)
    assert resolve_chunk("auto", small, 100, 4) is None  # 12,800 elements: below the threshold
    classes = torch.zeros(10**6, dtype=torch.long)
    assert resolve_chunk("auto", classes, 1000, 4) is None  # [B] labels: never chunked automatically
    assert resolve_chunk(7, classes, 1000, 4) == 7 and resolve_chunk(None, tokens, 152064, 4) is None
    limit = token_chunks.AUTO_MIN_ELEMENTS
    vocab = limit // (4 * 4096)
    assert resolve_chunk("auto", tokens, vocab, 4) is not None
    assert resolve_chunk("auto", tokens, vocab - 1, 4) is None
    assert count_distinct([tokens, tokens, small]) == 2


def test_bad_settings_name_what_is_allowed():
    for bad in (0, -3, 2.5, "yes", True):
        with pytest.raises(TokenChunkError, match="None .* 'auto' .* positive int"):
            check_token_chunk(bad)
    z = [torch.randn(1, 4, 5), torch.randn(1, 3, 5)]
    with pytest.raises(TokenChunkError, match="one shape"):
        chunked_terms(z, [], [], torch.zeros(1, 4, dtype=torch.long), temperature=1.0, chunk=2)


def test_compiles_with_fullgraph_and_matches_eager():
    z, y = _leaves(k=2, vocab=9), _labels(vocab=9)

    def loss(a, b):
        r = chunked_terms([a, b], [], [(b, a, True), (a, b, False)], y, temperature=2.0, chunk=14)  # 2 chunks
        return sum(r.ce) + 0.5 * sum(r.kd)

    eager = loss(*z)
    ref = torch.autograd.grad(eager, z)
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = compiled(*z)
    torch.testing.assert_close(got, eager, rtol=RTOL, atol=ATOL)
    for g, r in zip(torch.autograd.grad(got, z), ref):
        torch.testing.assert_close(g, r, rtol=RTOL, atol=ATOL)


def test_function_saves_only_its_inputs():
    """The forward keeps no vocabulary-sized temporaries for the backward: only the logits and labels."""
    z, y = _leaves(k=2, length=50, vocab=64), _labels(length=50, vocab=64)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ChunkedTokenLoss.apply(y, 2.0, (0, 1), ((1, 0, True),), (), 4, *z)
    assert {t.data_ptr() for t in saved} <= {y.data_ptr(), *(t.data_ptr() for t in z)}


@pytest.mark.parametrize("method", ["one", "tsa", "dml"])
def test_presets_on_a_tiny_llama_chunked_equal_unchunked(method, monkeypatch):
    """Through the HF wrapper (what the Trainer calls): shifted causal-LM labels, right padding and
    -100 inside a row; every loss part and every parameter gradient equal in float64."""
    hf = pytest.importorskip("tests.hf_tiny_models")
    from branchify.aggregators.base import Aggregator
    from branchify.integrations.hf import branchify_hf

    # A parameter-free aggregator (TSA's, DML's) computes in float32; float64 end to end here.
    monkeypatch.setattr(Aggregator, "compute_dtype", property(lambda self: torch.float64))

    model = branchify_hf(hf.make_zoo_model("llama"), method).double().train()
    model.okd.set_epoch(40, 300)  # ONE's ramp: a KD weight strictly between 0 and 1
    batch = hf.make_zoo_batch("llama", batch=2, seq=9)
    batch["labels"][0, 4] = -100
    results = []
    for chunk in (None, 3):
        model.okd.token_chunk = chunk
        model.zero_grad(set_to_none=True)
        out, _ = model.branched_output(**{k: v for k, v in batch.items() if k != "labels"})
        loss = model.compute_loss(out, batch["labels"])
        loss.total.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.parts, grads))
    (ref_parts, ref_grads), (parts, grads) = results
    assert set(parts) == set(ref_parts) and any(k.startswith("kd/") for k in parts)
    for k in ref_parts:
        torch.testing.assert_close(parts[k], ref_parts[k], rtol=RTOL, atol=ATOL, msg=k)
    assert set(grads) == set(ref_grads) and len(grads) > 10
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=RTOL, atol=ATOL)
    model.okd.token_chunk = 4
    assert torch.isfinite(model(**batch).loss)  # the Trainer's call: forward(**batch).loss


@pytest.mark.parametrize("make", ["mean", "mean_grad", "prob_attention", "classification"])
def test_online_kd_chunked_equals_unchunked(make, fake_model, output):
    """OnlineKD's own switch: a teacher that is a new tensor (Mean, detached or not), mixture
    teachers (PeerAttention in probability space: computed unchunked next to the chunked terms)
    and ``[B]`` classification labels with an explicit chunk size."""
    from branchify.aggregators import Mean, PeerAttention
    from branchify.online_kd import OnlineKD

    tokens = None if make == "classification" else 4
    y = torch.randint(0, 5, (6,) if tokens is None else (6, 4), generator=torch.Generator().manual_seed(3))
    if tokens is not None:
        y[0, 2:] = -100
    results = []
    for chunk in (None, 3):
        out = output(k=3, tokens=tokens)
        if make == "prob_attention":
            out.cuts[()] = torch.randn(6, 4, 8)
        agg = {"mean": Mean(), "mean_grad": Mean(detach=False), "classification": Mean(),
               "prob_attention": PeerAttention(space="prob")}[make]
        torch.manual_seed(0)  # the same attention weights in both runs
        model = fake_model(num_leaves=3, channels=8)
        okd = OnlineKD(model, agg, temperature=2.0, token_chunk=chunk)
        loss = okd(model(out), y)
        loss.total.backward()
        results.append((loss.parts, [z.grad for z in out.logits]))
    (ref_parts, ref_grads), (parts, grads) = results
    for k in ref_parts:
        torch.testing.assert_close(parts[k], ref_parts[k], rtol=1e-6, atol=1e-7, msg=k)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


def test_online_kd_default_is_auto_and_checked(fake_model):
    from branchify.online_kd import OnlineKD

    assert OnlineKD(fake_model(num_leaves=2)).token_chunk == "auto"
    with pytest.raises(TokenChunkError, match="token_chunk must be"):
        OnlineKD(fake_model(num_leaves=2), token_chunk=0)


@pytest.mark.slow  # ~40 s of tracing on a loaded 2-core machine
def test_online_kd_call_compiles_with_chunks(fake_model, output):
    """The whole loss call (teacher built by the aggregator, chunked terms, ramp tensor) in one graph."""
    from branchify.aggregators import Mean
    from branchify.online_kd import OnlineKD

    out = output(k=3, tokens=5)
    y = torch.randint(0, 5, (6, 5), generator=torch.Generator().manual_seed(0))
    y[1, 3:] = -100
    model = fake_model(num_leaves=3)
    okd = OnlineKD(model, Mean(detach=False), temperature=2.0, token_chunk=10)  # 3 chunks of 2 rows
    loss = lambda logits: okd(model(type(out)(logits, out.features, out.feature_maps, out.cuts,  # noqa: E731
                                              out.leaf_paths)), y).total
    eager = loss(out.logits)
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)(out.logits)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)
    ref = torch.autograd.grad(eager, out.logits)
    for g, r in zip(torch.autograd.grad(compiled, out.logits), ref):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-7)


def test_online_kd_auto_chunks_large_token_outputs_only(fake_model, output, monkeypatch):
    """The default ``token_chunk="auto"`` takes the chunked path above the threshold (lowered here),
    for token-level labels only."""
    import branchify.online_kd as online_kd
    from branchify.aggregators import Mean
    from branchify.online_kd import OnlineKD

    calls = []
    real = online_kd.chunked_terms
    monkeypatch.setattr(online_kd, "chunked_terms", lambda *a, **k: calls.append(k["chunk"]) or real(*a, **k))
    model = fake_model(num_leaves=3)
    okd = OnlineKD(model, Mean())
    tokens = torch.randint(0, 5, (6, 4), generator=torch.Generator().manual_seed(0))
    okd(model(output(k=3, tokens=4)), tokens)
    assert calls == []  # 6 x 4 x 5 x 4 elements: far below the threshold
    monkeypatch.setattr(token_chunks, "AUTO_MIN_ELEMENTS", 6 * 4 * 5 * 4)
    okd(model(output(k=3, tokens=4)), tokens)
    assert calls == [max(1, token_chunks.AUTO_CHUNK_ELEMENTS // (5 * 4))]
    okd(model(output(k=3)), torch.randint(0, 5, (6,)))
    assert len(calls) == 1  # [B] classification labels: never chunked automatically
