"""A linear teacher (``sum_k w_k z_k``, ONE's gated logits) in the token-chunked loss: formed chunk by
chunk, equal to the loss on the formed teacher in values and gradients (float64), never formed whole."""
import pytest
import torch
from token_chunk_inputs import _labels, _leaves
from torch.utils import _pytree as pytree

from branchify import token_chunks
from branchify.aggregators import Gate
from branchify.aggregators.base import AggregatorError
from branchify.functional import cross_entropy, kl_div_logits, valid_mask
from branchify.online_kd import OnlineKD
from branchify.outputs import LinearTeacher, Targets, teacher_logits, with_teacher_logits
from branchify.token_chunks import ChunkedTokenLoss, TokenChunkError, chunked_terms

RTOL, ATOL = 1e-10, 1e-13


def _weights(per, k=3, rows=3, length=7, seed=2):
    """Softmax weights, one per sample ``[B, K]`` or one per position ``[B, L, K]``."""
    g = torch.Generator().manual_seed(seed)
    shape = (rows, k) if per == "sample" else (rows, length, k)
    return torch.randn(*shape, generator=g, dtype=torch.float64).softmax(-1).requires_grad_()


def _one_loss(z, w, y, T, chunk, detach):
    """ONE's terms (leaf CEs, the teacher's CE, KD teacher -> every leaf), a DML-like pair and a leaf
    distilling into the teacher; the weighted total's gradients w.r.t. the leaves and the weights."""
    mix = LinearTeacher(z, w)
    if chunk is None:
        teacher, mask = mix.logits(), valid_mask(y, z[0])
        values = [cross_entropy(v, y) for v in [*z, teacher]]
        values += [kl_div_logits(teacher.detach() if detach else teacher, zk, T, mask) for zk in z]
        values += [kl_div_logits(z[1], z[0], T, mask), kl_div_logits(z[2].detach(), teacher, T, mask)]
    else:
        kd = [(mix, zk, detach) for zk in z] + [(z[1], z[0], False), (z[2], mix, True)]
        r = chunked_terms(z, [mix], kd, y, temperature=T, chunk=chunk)
        values = r.ce + r.kd
    coef = torch.linspace(0.5, 2.0, len(values), dtype=torch.float64)  # a distinct weight per term
    total = sum(c * v for c, v in zip(coef, values))
    return torch.stack([v.detach() for v in values]), torch.autograd.grad(total, [*z, w])


@pytest.mark.parametrize("chunk", [1, 3, 7, 15, 100])  # in-row chunks, whole rows, row groups
@pytest.mark.parametrize("per", ["sample", "position"])
@pytest.mark.parametrize("detach", [True, False])
def test_linear_teacher_equals_the_formed_teacher(chunk, per, detach):
    z, y = _leaves(), _labels()
    T = 2.5 if detach else 1.0
    ref, ref_grads = _one_loss(z, _weights(per), y, T, None, detach)
    got, got_grads = _one_loss(z, _weights(per), y, T, chunk, detach)
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL)
    assert got_grads[-1].shape == _weights(per).shape
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=RTOL, atol=ATOL)


def test_weights_get_the_closed_form_gradient():
    """d CE(sum_k w_k z_k) / d w_k = sum_v (softmax(t) - onehot(y))_v z_k,v / n, by hand."""
    z, y = _leaves(k=2), _labels()
    w = _weights("sample", k=2)
    (value,) = chunked_terms([], [LinearTeacher(z, w)], [], y, temperature=1.0, chunk=4).ce
    (got,) = torch.autograd.grad(value, [w])
    t = (w[:, None, None, :] * torch.stack(z, -1)).sum(-1).detach()
    m = (y != -100).double()
    d = (t.softmax(-1) - torch.nn.functional.one_hot(y.clamp_min(0), 11)) * m[..., None] / m.sum()
    want = torch.stack([(d * zk.detach()).sum((1, 2)) for zk in z], -1)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


def test_nothing_teacher_sized_is_saved_and_detached_parts_get_no_gradient():
    z, y = _leaves(k=2, length=50, vocab=64), _labels(length=50, vocab=64)
    w = torch.full((3, 2), 0.5, dtype=torch.float64, requires_grad=True)
    mix, saved = LinearTeacher(z, w), []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        chunked_terms(z, [mix], [(mix, z[0], True)], y, temperature=2.0, chunk=4)
    assert {t.data_ptr() for t in saved} <= {y.data_ptr(), w.data_ptr(), *(t.data_ptr() for t in z)}
    assert max(t.numel() for t in saved) == z[0].numel()  # the leaves: nothing of [tokens, vocab] beyond them
    r = chunked_terms([], [], [(mix, z[0], True)], y, temperature=2.0, chunk=4)
    g = torch.autograd.grad(r.kd[0], [w, z[1]], allow_unused=True)
    assert all(t is None or not t.any() for t in g)  # a detached teacher: nothing reaches its parts


def test_half_precision_leaves_with_float32_weights():
    z = [t.detach().to(torch.bfloat16).requires_grad_() for t in _leaves(k=2)]
    w, y = _weights("position", k=2).detach().float().requires_grad_(), _labels()
    r = chunked_terms(z, [LinearTeacher(z, w)], [(LinearTeacher(z, w), z[0], False)], y, temperature=3.0, chunk=5)
    assert r.ce[-1].dtype == torch.float32 and r.kd[0].dtype == torch.float32
    (r.ce[-1] + r.kd[0]).backward()
    assert z[1].grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    t = LinearTeacher([zk.detach() for zk in z], w.detach()).logits()
    torch.testing.assert_close(r.ce[-1], cross_entropy(t, y), rtol=1e-5, atol=1e-6)


def test_bad_weights_are_named():
    z, y = _leaves(k=2), _labels()
    with pytest.raises(TokenChunkError, match=r"needs weights \[B, 2\] or \[3, 7, 2\], got \[3, 7, 3\]"):
        chunked_terms(z, [LinearTeacher(z, _weights("position"))], [], y, temperature=1.0, chunk=4)
    other = [torch.randn(3, 6, 11, dtype=torch.float64) for _ in range(2)]
    with pytest.raises(TokenChunkError, match=r"one shape, got \(3, 7, 11\) and \(3, 6, 11\)"):
        chunked_terms(z, [LinearTeacher(other, _weights("sample", k=2))], [], y, temperature=1.0, chunk=4)


def test_formed_teacher_reads_as_logits_and_round_trips_as_a_pytree():
    z, w = _leaves(k=2), _weights("sample", k=2)
    mix = LinearTeacher(z, w)
    gate_formula = sum(w[:, k].reshape(3, 1, 1) * zk for k, zk in enumerate(z))  # what Gate computed inline
    assert torch.equal(mix.logits(), gate_formula) and teacher_logits(z[0]) is z[0]
    leaves, spec = pytree.tree_flatten(mix)
    assert len(leaves) == 3 and pytree.tree_unflatten(leaves, spec).weights is w
    formed = with_teacher_logits(Targets(kd=[], ce={"teacher": mix, "other": z[0]}))
    assert torch.equal(formed.ce["teacher"], gate_formula) and formed.ce["other"] is z[0]


def _one(fake_model, output, linear, chunk, detach=None, tokens=4, seed=0):
    """ONE (Gate, KD detached as its preset or not, ramp 1) on a synthetic token-level output: its parts and the
    gradients of the leaves and the gate."""
    torch.manual_seed(seed)  # the same gate in every run
    model, gate = fake_model(num_leaves=3, channels=8), Gate(linear_teacher=linear)
    okd = OnlineKD(model, gate, temperature=3.0, token_chunk=chunk, detach=detach)
    model.double()  # the gate too (built when attached): float64 teacher arithmetic
    out = output(k=3, tokens=tokens)
    out = type(out)([z.detach().double().requires_grad_() for z in out.logits], out.features, out.feature_maps,
                    {(): out.cuts[()].detach().double()}, out.leaf_paths)
    y = torch.randint(0, 5, (6, tokens), generator=torch.Generator().manual_seed(3))
    y[0, 2:] = -100
    y[3, 0] = -100
    result = model(out)
    loss = okd(result, y)
    params = [*out.logits, *gate.parameters()]
    return result.targets, loss.parts, torch.autograd.grad(loss.total, params)


@pytest.mark.parametrize("detach", [None, False])  # ONE's preset (detached KD teacher) and OKDDip's variant
def test_one_with_a_linear_teacher_equals_one_with_its_tensor(fake_model, output, detach):
    """Through Gate and OnlineKD: chunked with the linear teacher == unchunked with the tensor teacher
    (float64); unchunked with a linear teacher is the tensor path to the bit."""
    targets, ref_parts, ref_grads = _one(fake_model, output, False, None, detach)
    assert isinstance(targets.ce["teacher"], torch.Tensor)
    targets, parts, grads = _one(fake_model, output, True, 5, detach)
    assert isinstance(targets.ce["teacher"], LinearTeacher) and targets.kd[0].teacher is targets.ce["teacher"]
    for k in ref_parts:
        torch.testing.assert_close(parts[k], ref_parts[k], rtol=RTOL, atol=ATOL, msg=k)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=RTOL, atol=ATOL)
    _, parts, grads = _one(fake_model, output, True, None, detach)
    assert all(torch.equal(parts[k], ref_parts[k]) for k in ref_parts)
    assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads))


def test_gate_defers_only_large_token_level_outputs(fake_model, output, monkeypatch):
    def teacher(out, **kw):
        model = fake_model(num_leaves=3, channels=8)
        OnlineKD(model, Gate(**kw))
        return model(out).targets.ce["teacher"]

    assert isinstance(teacher(output(k=3, tokens=4)), torch.Tensor)  # 6 x 4 x 5 x 4 elements: small
    monkeypatch.setattr(token_chunks, "AUTO_MIN_ELEMENTS", 6 * 4 * 5 * 4)
    assert isinstance(teacher(output(k=3, tokens=4)), LinearTeacher)
    assert isinstance(teacher(output(k=3, b=600)), torch.Tensor)  # [B, C] classification: never by itself
    assert isinstance(teacher(output(k=3, tokens=4), linear_teacher=False), torch.Tensor)
    assert isinstance(teacher(output(k=3), linear_teacher=True), LinearTeacher)
    with pytest.raises(AggregatorError, match="'auto', True or False"):
        Gate(linear_teacher="yes")


def test_function_signature_takes_the_weights_after_the_logits():
    z, y = _leaves(k=2), _labels()
    w = _weights("position", k=2)
    got = ChunkedTokenLoss.apply(y, 1.0, (2,), (), ((0, 1),), 4, *z, w)
    torch.testing.assert_close(got[0], cross_entropy(LinearTeacher(z, w).logits(), y), rtol=RTOL, atol=ATOL)


def test_one_on_a_tiny_llama_with_a_linear_teacher(monkeypatch):
    """Through the HF wrapper (what the Trainer calls): ONE's gate hands its teacher as a
    LinearTeacher (as it does at vocabulary scale) and the chunked loss equals the unchunked loss
    with the tensor teacher, every part and every parameter gradient (gate included) in float64."""
    hf = pytest.importorskip("tests.hf_tiny_models")
    from branchify.integrations.hf import branchify_hf

    model = branchify_hf(hf.make_zoo_model("llama"), "one").double().train()
    model.okd.set_epoch(40, 300)  # ONE's ramp: a KD weight strictly between 0 and 1
    batch = hf.make_zoo_batch("llama", batch=2, seq=9)
    batch["labels"][0, 4] = -100
    results = []
    for linear, chunk in ((False, None), (True, 3)):
        model.branched.aggregator.linear_teacher = linear
        model.okd.token_chunk = chunk
        model.zero_grad(set_to_none=True)
        out, _ = model.branched_output(**{k: v for k, v in batch.items() if k != "labels"})
        assert isinstance(out.targets.ce["teacher"], LinearTeacher) == linear
        loss = model.compute_loss(out, batch["labels"])
        loss.total.backward()
        results.append((loss.parts, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (ref_parts, ref_grads), (parts, grads) = results
    assert set(parts) == set(ref_parts) and "ce/teacher" in parts
    for k in ref_parts:
        torch.testing.assert_close(parts[k], ref_parts[k], rtol=RTOL, atol=ATOL, msg=k)
    assert set(grads) == set(ref_grads) and any("aggregator" in n for n in grads)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=RTOL, atol=ATOL, msg=n)


def test_linear_teacher_compiles_with_fullgraph_and_matches_eager():
    z, y, w = _leaves(k=2, vocab=9), _labels(vocab=9), _weights("sample", k=2)

    def loss(a, b, weights):
        mix = LinearTeacher([a, b], weights)
        r = chunked_terms([a, b], [mix], [(mix, a, True), (mix, b, False)], y, temperature=2.0, chunk=14)
        return sum(r.ce) + 0.5 * sum(r.kd)

    eager = loss(*z, w)
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)(*z, w)
    torch.testing.assert_close(compiled, eager, rtol=RTOL, atol=ATOL)
    for g, r in zip(torch.autograd.grad(compiled, [*z, w]), torch.autograd.grad(eager, [*z, w])):
        torch.testing.assert_close(g, r, rtol=RTOL, atol=ATOL)
