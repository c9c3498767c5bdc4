"""Weight-space fusion: hybrid weights and fuse-back against hand computation, the hybrid model's
schedule, gradients and resume, and branch soups exported as the original class."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import branchify as bf
from branchify.fusion import FusionError, coefficients, fuse_back, hybrid_state, leaf_states, soup
from branchify.hybrid import WeightFusion

from conftest import TinyCifarResNet


def _tree(seed: int = 0, fanout: int = 2, split: str = "layer3", init: str = "auto") -> bf.BranchedModel:
    torch.manual_seed(seed)
    return bf.branchify(TinyCifarResNet(), bf.Spec(splits=[split], fanout=[fanout], init=init))


def _batch(i: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(50 + i)
    return torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 5, (8,), generator=g)


def _train_step(bm, opt, i):
    x, y = _batch(i)
    out = bm(x)
    loss = sum(nn.functional.cross_entropy(z, y) for z in out.logits)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return out


def _clone(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}


def test_leaf_states_share_the_trunk_and_hybrid_weights_equal_hand_computation(one_thread):
    bm = _tree(fanout=3)
    states = leaf_states(bm)
    assert states[0]["conv1.weight"] is states[2]["conv1.weight"]  # the trunk: one tensor
    assert states[0]["fc.weight"] is bm.segments["b0"].get_parameter("fc.weight")
    r = [0.2, 0.3, 0.5]
    mixed = hybrid_state(states, r)
    for k in ("layer3.1.conv1.weight", "fc.bias", "layer3.0.bn1.running_mean"):
        b = [bm.segments[f"b{i}"].state_dict()[k] for i in range(3)]
        torch.testing.assert_close(mixed[k], b[2] * 0.5 + (b[1] * 0.3 + b[0] * 0.2), rtol=0, atol=0)
    assert torch.equal(mixed["conv1.weight"], bm.segments["trunk"].conv1.weight)
    assert mixed["layer3.0.bn1.num_batches_tracked"].dtype == torch.long


def test_fuse_back_equals_hand_computation_and_changes_shared_tensors_once(one_thread):
    bm = _tree(fanout=2)
    states = leaf_states(bm)
    before = [_clone(s) for s in states]
    hybrid = {k: torch.randn_like(v, dtype=torch.float32) if v.is_floating_point() else v.clone() + 7
              for k, v in before[0].items()}
    hybrid["conv1.weight"] = states[0]["conv1.weight"]  # the trunk is its own hybrid
    fuse_back(states, hybrid, 0.25)
    for i, s in enumerate(leaf_states(bm)):
        torch.testing.assert_close(s["fc.weight"], hybrid["fc.weight"] * 0.25 + before[i]["fc.weight"] * 0.75,
                                   rtol=0, atol=0)
        n = hybrid["layer3.0.bn1.num_batches_tracked"].double() * 0.25 + \
            before[i]["layer3.0.bn1.num_batches_tracked"].double() * 0.75
        assert torch.equal(s["layer3.0.bn1.num_batches_tracked"], n.long())  # truncated, as the code's copy_
    assert torch.equal(leaf_states(bm)[0]["conv1.weight"], before[0]["conv1.weight"])
    with pytest.raises(FusionError, match=r"gamma=1.5 must be in \[0, 1\]"):
        fuse_back(states, hybrid, 1.5)


def test_soup_is_the_original_class_and_round_trips(one_thread):
    bm = _tree(fanout=3)
    avg = soup(bm)
    assert type(avg) is TinyCifarResNet
    expected = hybrid_state(leaf_states(bm), coefficients(3))
    for k, v in avg.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0, msg=k)
    fresh = TinyCifarResNet()
    fresh.load_state_dict(avg.state_dict(), strict=True)
    x = _batch()[0]
    torch.testing.assert_close(fresh.eval()(x), avg.eval()(x), rtol=0, atol=0)
    same = _tree(init="copy")  # identical leaves: the soup is the network itself
    torch.testing.assert_close(soup(same).eval()(x), same.export().eval()(x), rtol=0, atol=0)
    with pytest.raises(FusionError, match="one per leaf"):
        soup(bm, [0.5, 0.5])


def test_cohort_soup_and_mismatched_leaves():
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)) for _ in range(2)]
    avg = soup(bf.Cohort(nets), [0.25, 0.75])
    torch.testing.assert_close(avg[2].weight, nets[1][2].weight * 0.75 + nets[0][2].weight * 0.25, rtol=0, atol=0)
    other = bf.Cohort([nets[0], nn.Sequential(nn.Linear(4, 3))])
    with pytest.raises(FusionError, match="does not have leaf 0's architecture"):
        leaf_states(other)
    deepened, _ = bf.method("ahbf", TinyCifarResNet())
    with pytest.raises(FusionError, match="one architecture"):
        WeightFusion(fuse_every=None).attach(deepened)


def test_hybrid_output_is_the_mixture_run_on_the_batch(one_thread):
    bm = _tree(fanout=2)
    WeightFusion("mean", fuse_every=None).attach(bm)
    x = _batch()[0]
    expected = soup(bm).train()(x)  # training mode: batch statistics, as the hybrid's forward
    out = bm(x)
    torch.testing.assert_close(out.hybrid.logits[0], expected, rtol=1e-6, atol=1e-6)
    assert not out.hybrid.logits[0].requires_grad  # the code: a copy, no gradient to the students


def test_dirichlet_coefficients_build_the_hybrid(one_thread):
    bm = _tree(fanout=3)
    fusion = WeightFusion("dirichlet", fuse_every=None).attach(bm)
    torch.manual_seed(3)
    bm(_batch()[0])
    r = fusion.last_coefficients
    assert len(r) == 3 and abs(sum(r) - 1) < 1e-12 and len(set(r)) == 3
    expected = hybrid_state(leaf_states(bm), r)
    torch.testing.assert_close(fusion.model.fc.weight, expected["fc.weight"], rtol=0, atol=0)


def test_grad_true_sends_r_times_the_hybrid_gradient_to_each_leaf(one_thread):
    bm = _tree(fanout=2).double()
    WeightFusion("mean", grad=True, fuse_every=None).attach(bm)
    x, y = _batch()
    x = x.double()
    reference = soup(bm).train()
    loss_ref = nn.functional.cross_entropy(reference(x), y)
    g_ref = torch.autograd.grad(loss_ref, reference.fc.weight)[0]
    loss = nn.functional.cross_entropy(bm(x).hybrid.logits[0], y)
    g0, g1 = torch.autograd.grad(loss, [bm.segments["b0"].get_parameter("fc.weight"),
                                        bm.segments["b1"].get_parameter("fc.weight")])
    torch.testing.assert_close(g0, 0.5 * g_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g1, 0.5 * g_ref, rtol=1e-10, atol=1e-12)


def test_epoch_schedule_fuses_the_last_hybrid_after_each_epoch(one_thread):
    bm, okd = bf.method("okdph", TinyCifarResNet(), init="auto", gamma=0.5)
    opt = torch.optim.SGD(bm.parameters(), lr=0.1)
    with pytest.raises(FusionError, match="okd.set_epoch"):
        bm(_batch()[0])
    okd.set_epoch(0, 3)
    for i in range(2):
        _train_step(bm, opt, i)
    hybrid = _clone(bm.fusion.model.state_dict())  # built at the last forward, BN updated by it
    leaves = [_clone(s) for s in leaf_states(bm)]
    okd.set_epoch(0.5, 3)  # same epoch: nothing
    assert all(torch.equal(leaf_states(bm)[i]["fc.weight"], leaves[i]["fc.weight"]) for i in range(2))
    okd.set_epoch(1, 3)  # epoch 0 ended: 0 % 1 == 0
    for i, s in enumerate(leaf_states(bm)):
        for k in ("fc.weight", "layer1.0.bn1.running_var"):
            torch.testing.assert_close(s[k], hybrid[k] * 0.5 + leaves[i][k] * 0.5, rtol=0, atol=0)


def test_batch_schedule_counts_steps_and_resumes_bitwise(one_thread):
    def build():
        torch.manual_seed(0)
        bm, okd = bf.method("okdph", TinyCifarResNet(), init="auto", fuse_every="2_batch", gamma=0.3)
        return bm, okd, torch.optim.SGD(bm.parameters(), lr=0.1, momentum=0.9)

    def run(bm, okd, opt, steps):
        for i in steps:
            x, y = _batch(i)
            loss = okd(bm(x), y).total
            opt.zero_grad()
            loss.backward()
            opt.step()

    full, okd, opt = build()
    run(full, okd, opt, range(3))
    fused = _clone(leaf_states(full)[1])
    full(_batch(9)[0])  # step 2 is counted here, and 2 % 2 == 0: fused before this forward
    assert int(full.fusion.steps) == 3
    assert not torch.equal(fused["fc.weight"], leaf_states(full)[1]["fc.weight"])
    full, okd, opt = build()
    run(full, okd, opt, range(6))
    half, okd, opt = build()
    run(half, okd, opt, range(3))
    ckpt = {"model": copy.deepcopy(half.state_dict()), "opt": copy.deepcopy(opt.state_dict())}
    resumed, okd, opt = build()
    resumed.load_state_dict(ckpt["model"], strict=True)
    opt.load_state_dict(ckpt["opt"])
    run(resumed, okd, opt, range(3, 6))
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and "fusion.model.fc.weight" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_options_are_checked():
    with pytest.raises(FusionError, match="'mean'"):
        WeightFusion("median")
    with pytest.raises(FusionError, match="'1_epoch' or '5_batch'"):
        WeightFusion(fuse_every="every epoch")
    with pytest.raises(FusionError, match="gamma"):
        WeightFusion(gamma=2)
    with pytest.raises(FusionError, match="not attached"):
        WeightFusion().fuse()


def test_a_temporal_mean_and_a_hybrid_on_one_model(one_thread):
    bm = _tree(fanout=2)
    WeightFusion(fuse_every=None).attach(bm)
    ema = bf.TemporalMean(0.5).attach(bm)
    assert ema.model._modules.get("fusion") is None  # the EMA copies the leaves only
    opt = torch.optim.SGD(bm.parameters(), lr=0.1)
    out = _train_step(bm, opt, 0)
    assert out.hybrid is not None and out.temporal is not None
    sd = bm.state_dict()
    assert not any(k.startswith("temporal.model.fusion.") for k in sd) and "fusion.model.fc.weight" in sd


def test_batch_schedule_sees_fused_optimiser_steps(one_thread):
    torch.manual_seed(0)
    bm, okd = bf.method("okdph", TinyCifarResNet(), init="auto", fuse_every="1_batch")
    opt = torch.optim.AdamW(bm.parameters(), lr=0.01, fused=True)  # writes without bumping versions
    for i in range(3):
        x, y = _batch(i)
        loss = okd(bm(x), y).total
        opt.zero_grad()
        loss.backward()
        opt.step()
    bm(_batch(3)[0])
    assert int(bm.fusion.steps) == 3
