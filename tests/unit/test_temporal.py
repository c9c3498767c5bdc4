"""Temporal-mean (EMA) teachers: the update against hand computation, no line to forget,
state_dict / resume, export, Cohort and torch.compile."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import branchify as bf
from branchify.temporal import TemporalMean, TemporalMeanError

from conftest import TinyCifarResNet


def _model(seed: int = 0, **kw) -> bf.BranchedModel:
    torch.manual_seed(seed)
    bm, _ = bf.method("one", TinyCifarResNet(), **kw)
    return bm


def _batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 5, (8,), generator=g)


def _step(bm: nn.Module, opt: torch.optim.Optimizer, i: int) -> bf.BranchedOutput:
    x, y = _batch(i)
    out = bm(x)
    loss = sum(nn.functional.cross_entropy(z, y) for z in out.logits)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return out


def _live(bm: bf.BranchedModel) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in bm.named_parameters() if not k.startswith("aggregator.")}


def _ema(bm: bf.BranchedModel) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in bm.temporal.model.named_parameters()}


@pytest.mark.parametrize("warmup", [True, False])
def test_update_equals_hand_computation(one_thread, warmup):
    bm = _model()
    decay = 0.6
    TemporalMean(decay, warmup=warmup).attach(bm)
    opt = torch.optim.SGD(bm.parameters(), lr=0.1, momentum=0.9)
    expected = _live(bm)  # the copy starts as the weights
    for i in range(5):
        _step(bm, opt, i)
        live, n = _live(bm), i
        a = min(1 - 1 / (n + 1), decay) if warmup else decay  # shaoeric/PCL src/utils/ema.py lines 3-7
        expected = {k: a * expected[k] + (1 - a) * live[k] for k in expected}
    bm(_batch(9)[0])  # the last step is applied by the next forward
    assert int(bm.temporal.num_updates) == 5
    got = _ema(bm)
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-7, msg=k)
    if warmup:  # the first update is a plain copy, so the EMA is no longer the initial weights
        assert not torch.equal(got["segments.trunk.conv1.weight"], _model().segments["trunk"].conv1.weight)


def test_no_update_without_a_step_and_one_per_step(one_thread):
    bm = _model()
    ema = TemporalMean(0.9).attach(bm)
    opt = torch.optim.SGD(bm.parameters(), lr=0.1)
    x, y = _batch(0)
    for _ in range(3):  # gradient accumulation: forwards and backwards, no step
        sum(nn.functional.cross_entropy(z, y) for z in bm(x).logits).backward()
    assert int(ema.num_updates) == 0
    opt.step()
    bm.eval()  # eval() flushes the pending update
    assert int(ema.num_updates) == 1
    bm(x), bm(x)
    assert int(ema.num_updates) == 1


def test_teacher_outputs_are_the_ema_weights_and_detached(one_thread):
    bm = _model()
    TemporalMean(0.5).attach(bm)
    opt = torch.optim.SGD(bm.parameters(), lr=0.1)
    for i in range(3):
        _step(bm, opt, i)
    bm.eval()
    x = _batch(7)[0]
    out = bm(x)
    reference = copy.deepcopy(bm)  # a plain model holding the EMA weights
    reference.temporal = None
    with torch.no_grad():
        for k, p in reference.named_parameters():
            if not k.startswith("aggregator."):
                p.copy_(bm.temporal.model.get_parameter(k))
        for k, b in reference.named_buffers():
            if not k.startswith("aggregator."):
                b.copy_(bm.temporal.model.get_buffer(k))
    expected = reference.forward_leaves(x)
    assert out.temporal is not None and out.temporal.targets is None
    for z, e in zip(out.temporal.logits, expected.logits):
        assert not z.requires_grad
        torch.testing.assert_close(z, e, rtol=0, atol=0)
    assert not torch.allclose(out.logits[0], out.temporal.logits[0])


def test_export_of_the_ema_equals_its_outputs_and_deploy_switches_export(one_thread):
    bm = _model()
    ema = TemporalMean(0.5, deploy=False).attach(bm)
    opt = torch.optim.SGD(bm.parameters(), lr=0.1)
    for i in range(3):
        _step(bm, opt, i)
    student = ema.export(1).eval()
    assert type(student) is TinyCifarResNet and all(p.requires_grad for p in student.parameters())
    bm.eval()
    x = _batch(5)[0]
    out = bm(x)
    torch.testing.assert_close(student(x), out.temporal.logits[1], rtol=0, atol=0)
    live = bm.export(0)
    torch.testing.assert_close(live(x), out.logits[0], rtol=0, atol=0)
    ema.deploy = True  # the method deploys the temporal mean: model.export() is the EMA's
    torch.testing.assert_close(bm.export()(x), out.temporal.logits[0], rtol=0, atol=0)


def test_state_dict_round_trip_and_bitwise_resume(one_thread, tmp_path):
    def build():
        bm = _model()
        TemporalMean(0.7).attach(bm)
        return bm, torch.optim.SGD(bm.parameters(), lr=0.1, momentum=0.9)

    full, opt = build()
    for i in range(6):
        _step(full, opt, i)
    half, opt = build()
    for i in range(3):
        _step(half, opt, i)
    sd = half.state_dict()
    assert "temporal.num_updates" in sd and "temporal.model.segments.trunk.conv1.weight" in sd
    assert int(sd["temporal.num_updates"]) == 3  # state_dict() flushed the update of the last step
    torch.save({"model": sd, "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    resumed, opt = build()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed.load_state_dict(ckpt["model"], strict=True)
    opt.load_state_dict(ckpt["opt"])
    for i in range(3, 6):
        _step(resumed, opt, i)
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_cohort_ema_and_export(one_thread):
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3)) for _ in range(2)]
    cohort = bf.Cohort(nets)
    ema = TemporalMean(0.5, deploy=True).attach(cohort)
    opt = torch.optim.SGD(cohort.parameters(), lr=0.5)
    before = {k: p.detach().clone() for k, p in cohort.named_parameters()}
    x = torch.randn(4, 12)
    cohort(x).logits[1].sum().backward()
    opt.step()
    out = cohort.eval()(x)
    after = dict(cohort.named_parameters())
    for k in before:  # warm-up: the first update copies the weights after the step
        torch.testing.assert_close(ema.model.get_parameter(k), after[k].detach(), rtol=0, atol=0)
    deployed = cohort.export(1)
    assert isinstance(deployed, nn.Sequential) and len(list(deployed.parameters())) == 4
    torch.testing.assert_close(deployed(x), out.temporal.logits[1], rtol=0, atol=0)


def test_errors_name_the_fix():
    with pytest.raises(TemporalMeanError, match=r"decay=1.5 must be a float in \[0, 1\)"):
        TemporalMean(1.5)
    with pytest.raises(TemporalMeanError, match="buffers='copy'"):
        TemporalMean(teach=False, buffers="own")
    with pytest.raises(TemporalMeanError, match="choose 'own'"):
        TemporalMean(buffers="ema")
    with pytest.raises(TemporalMeanError, match="branched model"):
        TemporalMean().attach(nn.Linear(2, 2))
    bm = _model()
    TemporalMean().attach(bm)
    with pytest.raises(TemporalMeanError, match="already has a temporal-mean teacher"):
        TemporalMean().attach(bm)
    with pytest.raises(TemporalMeanError, match="not attached"):
        TemporalMean().update()


def test_teach_false_runs_no_copy_and_copies_buffers(one_thread):
    bm = _model()
    ema = TemporalMean(0.5, teach=False).attach(bm)
    opt = torch.optim.SGD(bm.parameters(), lr=0.1)
    out = _step(bm, opt, 0)
    assert out.temporal is None
    bm.eval()
    live = dict(bm.named_buffers())
    for k, b in ema.model.named_buffers():
        assert torch.equal(b, live[k]), k


@pytest.mark.slow
def test_works_under_torch_compile(one_thread):
    eager = _model()
    TemporalMean(0.6).attach(eager)
    compiled_model = _model()
    TemporalMean(0.6).attach(compiled_model)
    compiled = torch.compile(compiled_model)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt_c = torch.optim.SGD(compiled_model.parameters(), lr=0.1)
    for i in range(4):
        oe, oc = _step(eager, opt_e, i), _step(compiled, opt_c, i)
        torch.testing.assert_close(oc.temporal.logits[0], oe.temporal.logits[0], rtol=1e-4, atol=1e-5)
    assert int(compiled_model.temporal.num_updates) == int(eager.temporal.num_updates) == 3


@pytest.mark.parametrize("kind", ["fused", "foreach", "hand"])
def test_steps_are_seen_whatever_writes_them(one_thread, kind):
    bm = _model()
    ema = TemporalMean(0.5).attach(bm)
    params = [p for k, p in bm.named_parameters() if not k.startswith("aggregator.")]
    x, y = _batch(0)
    bm(x)
    if kind == "hand":  # a hand-written update (no optimiser): seen through the version counters
        with torch.no_grad():
            for p in params:
                p.add_(0.01)
    else:  # fused kernels do not bump version counters: the optimiser step hook sees them
        opt = torch.optim.AdamW(params, lr=0.01, **{kind: True})
        sum(nn.functional.cross_entropy(z, y) for z in bm(x).logits).backward()
        opt.step()
    bm(x)
    assert int(ema.num_updates) == 1
    other = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)  # an unrelated optimiser: no update
    other.param_groups[0]["params"][0].grad = torch.ones(1)
    other.step()
    bm(x)
    assert int(ema.num_updates) == 1
    clone = copy.deepcopy(bm)  # a copy watches its own weights
    with torch.no_grad():
        next(clone.parameters()).add_(1.0)
    clone(x), bm(x)
    assert int(clone.temporal.num_updates) == 2 and int(ema.num_updates) == 1
