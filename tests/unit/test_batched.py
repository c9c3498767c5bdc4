"""Batched replicas (one vmapped call per group of identical siblings) equal the per-replica loop."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import branchify as bf
import branchify.surgery.batched as batched_mod
from branchify.surgery.vmap_batchnorm import VmapBatchNorm
from branchify.surgery.stacking import stack_replicas, write_back

from conftest import TinyCifarResNet
from toy_models import Stages

from batched_pairs import SPECS, _close, _pair, _sgd_step


@pytest.mark.parametrize("name", list(SPECS))
def test_train_step_equals_the_loop(name):
    loop, batched = _pair(SPECS[name])
    assert batched.batch_groups, "this tree has identical siblings, so it must have a group"
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    out_l, out_b = _sgd_step(loop.train(), x, y), _sgd_step(batched.train(), x, y)
    for k in range(loop.num_leaves):
        _close(out_b.logits[k], out_l.logits[k], f"logits of leaf {k}")
        _close(out_b.features[k], out_l.features[k], f"features of leaf {k}")
    assert list(out_b.cuts) == list(out_l.cuts)
    for path in out_l.cuts:
        _close(out_b.cuts[path], out_l.cuts[path], f"cut {path}")
    grads_l = {n: p.grad for n, p in loop.named_parameters()}
    for n, p in batched.named_parameters():
        assert (p.grad is None) == (grads_l[n] is None), n
        if p.grad is not None:
            _close(p.grad, grads_l[n], f"grad of {n}")
    # after the SGD step: parameters and BatchNorm statistics (num_batches_tracked included)
    sd_l = loop.state_dict()
    for k, v in batched.state_dict().items():
        _close(v, sd_l[k], k)
    counters = [v for k, v in batched.state_dict().items() if k.endswith("num_batches_tracked")]
    assert counters and all(int(v) == 1 for v in counters)
    for leaf in range(loop.num_leaves):
        ref = loop.export(leaf).eval()(x)
        _close(batched.export(leaf).eval()(x), ref, f"export of leaf {leaf}")


def test_eval_mode_equals_the_loop_and_leaves_stats_alone():
    loop, batched = _pair(SPECS["tsa"])
    x = torch.randn(3, 3, 16, 16)
    before = {k: v.clone() for k, v in batched.state_dict().items()}
    with torch.no_grad():
        out_l, out_b = loop.eval()(x), batched.eval()(x)
    for a, b in zip(out_b.logits, out_l.logits):
        _close(a, b, "eval logits")
    assert all(torch.equal(v, before[k]) for k, v in batched.state_dict().items())


def test_groups_follow_the_tree():
    _, tsa = _pair(SPECS["tsa"])
    assert [(g.level, g.parents, g.fanout) for g in tsa.batch_groups] == [
        (1, [()], 2), (2, [(0,), (1,)], 2)]
    _, u_tsa = _pair(SPECS["u_tsa"])
    assert [(g.level, g.members) for g in u_tsa.batch_groups] == [
        (1, [(0,), (1,)]), (2, [(0, 0), (0, 1), (0, 2)])]  # (1, 0) is alone: it runs on the loop


def test_deepened_leaves_fall_back_to_the_loop():
    spec = bf.Spec(splits=["layer2"], fanout=[4], deepen={"layer2": [0, 0, 1, 2]})
    loop, batched = _pair(spec, Stages())
    assert [g.members for g in batched.batch_groups] == [[(0,), (1,)]]  # the two undeepened leaves
    ahbf = bf.branchify(Stages(), bf.Spec(splits=["layer2"], fanout=[3], deepen={"layer2": [0, 1, 2]}))
    assert ahbf.batch_groups == []
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 4, (2,))
    for a, b in zip(_sgd_step(batched.train(), x, y).logits, _sgd_step(loop.train(), x, y).logits):
        _close(a, b, "logits")


def test_state_dict_round_trips_between_forms():
    loop, batched = _pair(SPECS["one"])
    x, y = torch.randn(2, 3, 16, 16), torch.randint(0, 5, (2,))
    _sgd_step(batched.train(), x, y)
    assert batched.state_dict().keys() == loop.state_dict().keys()
    assert "segments.b1.layer3.0.conv1.weight" in batched.state_dict()
    buf = io.BytesIO()
    torch.save(batched.state_dict(), buf)
    buf.seek(0)
    fresh = copy.deepcopy(loop)  # loop form, different weights until loaded
    fresh.load_state_dict(torch.load(buf))
    with torch.no_grad():
        for a, b in zip(fresh.eval()(x).logits, batched.eval()(x).logits):
            _close(a, b, "loop form loaded from a batched checkpoint")
    back = copy.deepcopy(batched)
    back.load_state_dict(fresh.state_dict())
    with torch.no_grad():
        for a, b in zip(back.eval()(x).logits, fresh.eval()(x).logits):
            _close(a, b, "batched form loaded from a loop checkpoint")


def test_switching_forms_keeps_the_optimiser_and_parameters():
    _, model = _pair(SPECS["one"])
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    x, y = torch.randn(2, 3, 16, 16), torch.randint(0, 5, (2,))
    for mode in (True, False, True):
        model.batched = mode
        loss = sum(F.cross_entropy(z, y) for z in model(x).logits)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert list(model.parameters()) == params
    assert all(p.grad is not None for p in model.segments["b2"].parameters())


def test_batchnorm_cumulative_average_momentum_none():
    net = TinyCifarResNet()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    loop, batched = _pair(SPECS["one"], net)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    for _ in range(3):
        _sgd_step(loop.train(), x, y)
        _sgd_step(batched.train(), x, y)
    sd_l = loop.state_dict()
    for k, v in batched.state_dict().items():
        _close(v, sd_l[k], k)
    assert all(m.momentum is None for m in batched.modules() if isinstance(m, nn.BatchNorm2d))
    # replicas that have seen different numbers of batches cannot share one factor: loop fallback
    batched.segments["b1"].get_buffer("layer3.0.bn1.num_batches_tracked").add_(5)
    with pytest.raises(RuntimeError, match="different numbers of batches"):
        batched(x)
    batched.batched = "auto"  # auto runs it on the loop instead (here: CPU, so the loop anyway)
    batched(x)


def test_dropout_masks_differ_per_replica():
    net = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    model = bf.branchify(net, bf.Spec(splits=["1"], fanout=[2], init="copy"), batched=True).train()
    out = model(torch.ones(64, 8))
    assert not torch.equal(out.logits[0], out.logits[1])  # identical weights: only dropout differs
    model.eval()
    out = model(torch.ones(64, 8))
    torch.testing.assert_close(out.logits[0], out.logits[1])


def test_auto_uses_the_loop_on_cpu_and_vmap_on_cuda():
    assert not batched_mod.wants_vmap("auto", torch.device("cpu"))
    assert batched_mod.wants_vmap("auto", torch.device("cuda", 0))
    assert batched_mod.wants_vmap(True, torch.device("cpu"))
    assert not batched_mod.wants_vmap(False, torch.device("cuda"))
    with pytest.raises(ValueError, match="batched="):
        bf.branchify(TinyCifarResNet(), SPECS["one"], batched="yes")
    model, _ = bf.method("one", TinyCifarResNet(), batched=True)
    assert model.batched is True


class _ItemScale(nn.Module):
    """Reads a tensor value in Python (``.item()``), which vmap cannot batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1.0 + 0.0 * x.mean().item())


class _ItemNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(6, 6)
        self.scale = _ItemScale()
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.scale(self.stem(x)))


def test_auto_falls_back_to_the_loop_when_vmap_cannot_run(monkeypatch):
    spec = bf.Spec(splits=["stem"], fanout=[2])
    tracer = bf.Tracer(leaf_modules=[_ItemScale])
    strict = bf.branchify(_ItemNet(), spec, tracer=tracer, batched=True)
    with pytest.raises(RuntimeError, match="cannot run as one vmapped call"):
        strict(torch.randn(4, 6))
    monkeypatch.setattr(batched_mod, "AUTO_DEVICES", ("cpu",))  # let "auto" vmap on this CPU
    auto = bf.branchify(_ItemNet(), spec, tracer=tracer, batched="auto")
    ref = copy.deepcopy(auto)
    ref.batched = False
    x = torch.randn(4, 6)
    with pytest.warns(UserWarning, match="run one call each from now on"):
        out = auto(x)
    assert auto.batch_groups[0].disabled is not None
    for a, b in zip(out.logits, ref(x).logits):
        _close(a, b, "fallback logits")
    # bad inputs are the caller's error, not vmap's: the loop raises it and the group stays batched
    peers = bf.branchify(nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 3)), bf.Spec(splits=["<input>"], fanout=[2]))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        peers(torch.randn(4, 7))
    assert peers.batch_groups[0].disabled is None


def test_describe_ensemble_and_dtype_moves_work_batched():
    loop, batched = _pair(SPECS["tsa"])
    x = torch.randn(2, 3, 16, 16)
    assert batched.describe(x, print_fn=None) == loop.describe(x, print_fn=None)
    with torch.no_grad():
        _close(batched.eval().ensemble()(x), loop.eval().ensemble()(x), "ensemble")
        batched.double()
        loop.double()
        for a, b in zip(batched(x.double()).logits, loop(x.double()).logits):
            _close(a, b, "float64")


def test_stacking_keeps_layouts_and_gradients_come_back():
    ws = [torch.randn(4, 3, 2, 2).to(memory_format=torch.channels_last).requires_grad_() for _ in range(3)]
    bs = [torch.randn(4, requires_grad=True) for _ in range(3)]
    w, b = stack_replicas([[w_, b_] for w_, b_ in zip(ws, bs)])
    assert w.shape == (3, 4, 3, 2, 2) and w[1].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(w[2], ws[2]) and torch.equal(b[1], bs[1])
    (w.sum(dim=(1, 2, 3, 4)) * torch.arange(3.)).sum().backward()
    assert [float(t.grad.mean()) for t in ws] == [0.0, 1.0, 2.0]
    assert ws[1].grad.is_contiguous(memory_format=torch.channels_last)
    dst = [[torch.zeros(2)], [torch.zeros(2)]]
    write_back([torch.tensor([[1.0, 2.0], [3.0, 4.0]])], dst)
    assert dst[1][0].tolist() == [3.0, 4.0]


def test_ddp_accepts_the_batched_form(tmp_path):
    dist = torch.distributed
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    loop, batched = _pair(SPECS["tsa"])
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(batched.train())
        for _ in range(2):  # every parameter is used once per step, and DDP's reducer sees all of them
            _sgd_step(ddp, x, y)
    finally:
        dist.destroy_process_group()
    for _ in range(2):
        _sgd_step(loop.train(), x, y)
    sd_l = loop.state_dict()
    for k, v in batched.state_dict().items():
        _close(v, sd_l[k], k)


def _saved_mb(model: nn.Module, x: torch.Tensor) -> float:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sum(z.sum() for z in model(x).logits).backward()
    return sum(storages.values()) / 2**20


def test_batched_batchnorm_saves_no_more_activations_than_the_loop():
    # vmap's own batch_norm rule applies the affine part as separate ops and keeps one more
    # activation per BatchNorm; the folded BatchNorm keeps what the loop keeps.
    loop, batched = _pair(SPECS["dml"])
    x = torch.randn(4, 3, 16, 16)
    assert _saved_mb(batched.train(), x) <= 1.02 * _saved_mb(loop.train(), x)
    assert all(type(m) is not VmapBatchNorm for m in batched.modules())  # segments untouched


@pytest.mark.parametrize("kind", ["no_affine", "no_running_stats"])
def test_batchnorm_variants_equal_the_loop(kind):
    net = TinyCifarResNet()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            if kind == "no_affine":
                m.affine, m.weight, m.bias = False, None, None
            else:
                m.track_running_stats, m.running_mean, m.running_var, m.num_batches_tracked = False, None, None, None
    loop, batched = _pair(SPECS["tsa"], net)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    for a, b in zip(_sgd_step(batched.train(), x, y).logits, _sgd_step(loop.train(), x, y).logits):
        _close(a, b, "train logits")
    with torch.no_grad():
        for a, b in zip(batched.eval()(x).logits, loop.eval()(x).logits):
            _close(a, b, "eval logits")


def test_two_forwards_then_one_backward():
    # the running statistics are updated in place by the second forward; backward must not need them
    loop, batched = _pair(SPECS["one"])
    x1, x2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    for m in (loop.train(), batched.train()):
        (sum(z.sum() for z in m(x1).logits) + sum(z.sum() for z in m(x2).logits)).backward()
    grads_l = dict(loop.named_parameters())
    for n, p in batched.named_parameters():
        if p.grad is not None:
            _close(p.grad, grads_l[n].grad, f"grad of {n}")
