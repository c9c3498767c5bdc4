"""Every preset's loss equals an independent re-implementation of its authors' public code.

Each ``authors_*`` function below re-writes, with plain torch ops and in the authors' own order of
operations, what the cited file and lines compute; it reads only the branched output's tensors
and the aggregator's parameters (the same weights the authors' module would hold). The tests run
a real branched CIFAR-style ResNet in float64 and compare the loss value and its gradients with
respect to every output tensor and every aggregator parameter (relative tolerance 1e-5).

The authors' KL (``KLLoss`` / ``KL_Loss``) adds 1e-7 to the teacher probabilities as a guard
against log(0); branchify computes the exact KL in log space instead. The references keep the
authors' 1e-7: the tolerance covers it on these inputs (its effect is ~1e-7 per class).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import branchify as bf
from branchify.md import md_loss
from branchify.schedules import IntervalSchedule

RTOL = 1e-5


# ---------------------------------------------------------------------- authors' building blocks
def kl_loss(student: torch.Tensor, teacher: torch.Tensor, T: float = 3.0, detach: bool = False) -> torch.Tensor:
    """OKDDip ``utils.py`` ``KL_Loss.forward`` (lines 167-181; ONE's ``loss/kl_loss.py`` lines 13-23
    is the same with ``detach=True``): ``T^2 * KLDivLoss(batchmean)(log_softmax(s/T), softmax(t/T) + 1e-7)``."""
    log_s = F.log_softmax(student / T, dim=1)
    t = F.softmax(teacher / T, dim=1) + 1e-7
    if detach:
        t = t.detach()
    return T * T * (t * (t.log() - log_s)).sum(1).sum() / t.size(0)


def sigmoid_rampup(current: float, length: float) -> float:
    """``utils/ramps.py`` / ``get_current_consistency_weight``: ``exp(-5 (1 - clip(e, 0, L)/L)^2)``."""
    if length == 0:
        return 1.0
    phase = 1.0 - min(max(current, 0.0), length) / length
    return float(math.exp(-5.0 * phase * phase))


def bn_train(x: torch.Tensor, bn: torch.nn.Module) -> torch.Tensor:
    """``nn.BatchNorm1d/2d`` in training mode, written out (batch statistics, biased variance)."""
    dims = (0,) if x.dim() == 2 else (0, 2, 3)
    shape = (1, -1) if x.dim() == 2 else (1, -1, 1, 1)
    mu = x.mean(dim=dims, keepdim=True)
    var = ((x - mu) ** 2).mean(dim=dims, keepdim=True)
    return (x - mu) / torch.sqrt(var + bn.eps) * bn.weight.view(shape) + bn.bias.view(shape)


def ce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -F.log_softmax(z, dim=1).gather(1, y[:, None]).mean()


# ---------------------------------------------------------------------- the authors' losses
def authors_one(out, agg, y, epoch, epochs):
    """``Lan1991Xu/ONE_NeurIPS2018@54afde3``: gate ``models/cifar/resnet.py`` lines 237-263
    (AvgPool of the layer2 output, control_v1, bn_v1, ReLU, softmax, weighted sum of logits),
    loss ``cifar_one.py`` lines 292-304 (CE of 3 branches + teacher, KLLoss with the detached
    teacher times the 80-epoch ramp; branchify scales 80 of 300 epochs to the run)."""
    x_c = out.cuts[()].mean(dim=(2, 3))
    x_c = F.softmax(F.relu(bn_train(x_c @ agg.fc.weight.T + agg.fc.bias, agg.bn)), dim=1)
    x_m = sum(x_c[:, i].view(-1, 1) * z for i, z in enumerate(out.logits))
    loss_cross = sum(ce(z, y) for z in out.logits) + ce(x_m, y)
    w = sigmoid_rampup(epoch, 80 / 300 * epochs)
    return loss_cross + w * sum(kl_loss(z, x_m, detach=True) for z in out.logits)


def authors_cl_ilr(out, agg, y, epoch, epochs):
    """``DefangChen/OKDDip@c6a05de``: ``train_one.py --avg --bpscale``. Targets from
    ``models/model_cifar/resnet_one.py`` lines 236-247 (branch i's target is the mean of the
    other branches' logits), loss ``train_one.py`` lines 105-108 and 115: CE of every branch
    plus ``alpha * w(e) * KL`` with the 80-epoch ramp, nothing detached, no CE on the targets."""
    pro = torch.stack(out.logits, dim=-1)  # B x C x K
    k = pro.shape[-1]
    loss_true, loss_group = 0, 0
    for i in range(k):
        target = sum(pro[:, :, j] / (k - 1) for j in range(k) if j != i)
        loss_true = loss_true + ce(pro[:, :, i], y)
        loss_group = loss_group + kl_loss(pro[:, :, i], target)
    return loss_true + 1.0 * sigmoid_rampup(epoch, 80 / 300 * epochs) * loss_group


def authors_okddip(out, agg, y, epoch, epochs, leader=0):
    """``DefangChen/OKDDip@c6a05de``: attention ``models/model_cifar/resnet_GL.py`` lines 198-221
    (shared query/key Linear without bias, ``energy = q k^T`` without scaling, softmax over peers
    including self, ``x_m = pro @ attention^T`` on logits), loss ``train_GL.py`` lines 99-104: CE
    of peers and leader + ``alpha * w(e) * (sum_i KL(x_m_i || z_i) + KL(mean_j z_j || z_leader))``,
    nothing detached. The authors' leader is their last branch; here it is the target leaf."""
    peers = [k for k in range(len(out.logits)) if k != leader]
    pro = torch.stack([out.logits[k] for k in peers], dim=-1)
    h = torch.stack([out.features[k] for k in peers], dim=1)  # B x P x C
    proj_q, proj_k = h @ agg.w_l.weight.T, h @ agg.w_e.weight.T
    attention = F.softmax(torch.bmm(proj_q, proj_k.permute(0, 2, 1)), dim=-1)
    x_m = torch.bmm(pro, attention.permute(0, 2, 1))
    loss_true = sum(ce(pro[:, :, i], y) for i in range(len(peers)))
    loss_group = sum(kl_loss(pro[:, :, i], x_m[:, :, i]) for i in range(len(peers)))
    x_stu = out.logits[leader]
    w = sigmoid_rampup(epoch, 80 / 300 * epochs)
    return loss_true + ce(x_stu, y) + 1.0 * w * (loss_group + kl_loss(x_stu, torch.mean(pro, dim=2)))


def authors_okddip_en(out, agg, y, epoch, epochs):
    """The authors' ``en`` mode (``resnet_GL.py`` lines 204-222): every branch is a peer, no leader."""
    pro = torch.stack(out.logits, dim=-1)
    h = torch.stack(out.features, dim=1)
    attention = F.softmax(torch.bmm(h @ agg.w_l.weight.T, (h @ agg.w_e.weight.T).permute(0, 2, 1)), dim=-1)
    x_m = torch.bmm(pro, attention.permute(0, 2, 1))
    loss = sum(ce(pro[:, :, i], y) for i in range(pro.shape[-1]))
    return loss + sigmoid_rampup(epoch, 80 / 300 * epochs) * sum(kl_loss(pro[:, :, i], x_m[:, :, i])
                                                                 for i in range(pro.shape[-1]))


def authors_ahbf(out, agg, y, epoch, epochs, lambdas, own_ta=True):
    """``linruigong965/AHBF@ecb8b2c``: fusion ``AHBF-pytorch/models/model_backbone/resnet_ahbf.py``
    lines 132-155 (``F~ = bn1(conv1(cat[x, y]))``, gate ``softmax(relu(bn_v1(control_v1(pool F~))))``,
    ``logit = g0 * logit_x + g1 * logit_y``) and its recursion in ``forward`` (lines 493-505); loss
    ``train_ahbf.py`` lines 106-120 with ``kd_weight = 1`` and the ramp over all epochs
    (``--rampup`` = the run length), nothing detached."""
    l1, l2 = lambdas
    logitlist, featurelist = out.logits, out.feature_maps
    ensem_fea, ensem_logits = [], []
    for i, f in enumerate(agg.fusions):
        x, lx = (featurelist[0], logitlist[0]) if i == 0 else (ensem_fea[i - 1], ensem_logits[i - 1])
        feasc = torch.cat([x, featurelist[i + 1]], dim=1)
        feasc = torch.einsum("oi,bihw->bohw", f.conv.weight[:, :, 0, 0], feasc) + f.conv.bias.view(1, -1, 1, 1)
        feasc = bn_train(feasc, f.bn)
        feas = F.softmax(F.relu(bn_train(feasc.mean(dim=(2, 3)) @ f.fc.weight.T + f.fc.bias, f.bn_gate)), dim=1)
        ensem_logits.append(feas[:, 0].view(-1, 1) * lx + feas[:, 1].view(-1, 1) * logitlist[i + 1])
        ensem_fea.append(feasc)
    c = 1.0 * sigmoid_rampup(epoch, epochs)
    loss_true = sum(ce(z, y) for z in logitlist) + sum(ce(z, y) for z in ensem_logits)
    dkd, ekd = 0, 0
    for i in range(len(logitlist) - 1):
        prev = logitlist[0] if i == 0 else ensem_logits[i - 1]
        dkd = dkd + kl_loss(prev, logitlist[i + 1]) * c * l2
        ekd = ekd + kl_loss(prev, ensem_logits[i]) * c * l1
        if own_ta:
            ekd = ekd + kl_loss(logitlist[i + 1], ensem_logits[i]) * c * l1
    return loss_true + dkd + ekd


def documented_tsa(out, agg, y, epoch, epochs, a=0.5, T=3.0):
    """TSA has no public code; its documented formula (docs/methods/tsa.md):
    ``sum_k [(1 - a) CE(z_k) + a T^2 / (K-1) sum_{j != k} KL(p_j || p_k)]``, peers detached."""
    k = len(out.logits)
    return sum((1 - a) * ce(z, y) + a / (k - 1) * sum(kl_loss(z, out.logits[j], T, detach=True)
                                                        for j in range(k) if j != i)
               for i, z in enumerate(out.logits))


def dml_pairwise(out, agg, y, epoch, epochs, T=1.0):
    """DML (Zhang et al.; the PyTorch port's ``trainer.py``): ``CE + 1/(K-1) sum_{j != k} KL(p_j || p_k)``,
    T = 1, peers detached (each network's update sees the others as constants)."""
    k = len(out.logits)
    return sum(ce(z, y) + sum(kl_loss(z, out.logits[j], T, detach=True) for j in range(k) if j != i) / (k - 1)
               for i, z in enumerate(out.logits))


def okddip_dml(out, agg, y, epoch, epochs, T=1.0):
    """OKDDip's DML, "ensemble first" (``train_DML.py`` lines 90-106): CE + KL from the mean of the
    other peers' logits, not detached (with this preset's T = 1)."""
    k = len(out.logits)
    return sum(ce(z, y) + kl_loss(z, sum(out.logits[j] for j in range(k) if j != i) / (k - 1), T)
               for i, z in enumerate(out.logits))


# ---------------------------------------------------------------------- harness
def _branched(tiny_resnet, name, **overrides):
    torch.manual_seed(0)
    model, okd = bf.method(name, tiny_resnet(num_classes=5), model_fn=lambda: tiny_resnet(num_classes=5),
                           **overrides)
    return model.double().train(), okd


def _tensors(out):
    ts = list(out.logits) + [f for f in out.features if f is not None] + \
        [f for f in out.feature_maps if f is not None] + list(out.cuts.values())
    return [t for t in ts if t.requires_grad]


def assert_matches_authors(model, okd, reference, epochs_to_check=(0, 40, 299), total=300, **ref_kw):
    torch.manual_seed(1)
    x, y = torch.randn(6, 3, 16, 16, dtype=torch.float64), torch.randint(0, 5, (6,))
    for epoch in epochs_to_check:
        out = model(x)
        okd.set_epoch(epoch, total)
        ours = okd(out, y).total
        theirs = reference(out, model.aggregator, y, epoch, total, **ref_kw)
        assert ours.dtype == torch.float64
        torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=0)
        wrt = _tensors(out) + [p for p in model.aggregator.parameters()]
        g_ours = torch.autograd.grad(ours, wrt, allow_unused=True, retain_graph=True)
        g_theirs = torch.autograd.grad(theirs, wrt, allow_unused=True)
        scale = max(float(g.abs().max()) for g in g_theirs if g is not None)
        for i, (a, b) in enumerate(zip(g_ours, g_theirs)):
            a = torch.zeros_like(wrt[i]) if a is None else a
            b = torch.zeros_like(wrt[i]) if b is None else b
            # relative to the largest gradient entry: entries near 0 carry only round-off
            torch.testing.assert_close(a, b, rtol=RTOL, atol=RTOL * scale, msg=f"gradient {i} at epoch {epoch}")


# ---------------------------------------------------------------------- the tests
def test_one_equals_authors_code(tiny_resnet):
    assert_matches_authors(*_branched(tiny_resnet, "one"), authors_one)


def test_cl_ilr_equals_authors_code(tiny_resnet):
    model, okd = _branched(tiny_resnet, "cl_ilr")
    assert model.spec.grad_scale == {"layer3": 1 / 3}  # the backprop rescaling (resnet_one.py line 218)
    assert_matches_authors(model, okd, authors_cl_ilr)


def test_cl_ilr_gradient_into_the_trunk_is_rescaled_by_one_over_k(tiny_resnet):
    """``ILR.backward`` (resnet_one.py lines 118-121) divides the trunk's incoming gradient by K."""
    grads = {}
    for rescale in (True, False):
        model, okd = _branched(tiny_resnet, "cl_ilr", rescale=rescale)
        okd.set_epoch(299, 300)
        torch.manual_seed(1)
        out = model(torch.randn(6, 3, 16, 16, dtype=torch.float64))
        okd(out, torch.randint(0, 5, (6,))).total.backward()
        grads[rescale] = model.segments["trunk"].get_submodule("conv1").weight.grad.clone()
    torch.testing.assert_close(grads[True], grads[False] / 3, rtol=1e-9, atol=1e-12)


def test_okddip_equals_authors_code(tiny_resnet):
    assert_matches_authors(*_branched(tiny_resnet, "okddip"), authors_okddip)


def test_okddip_without_leader_equals_authors_en_mode(tiny_resnet):
    assert_matches_authors(*_branched(tiny_resnet, "okddip", leader=None), authors_okddip_en)


@pytest.mark.parametrize("lambdas", [(1.0, 1.0), (4.0, 2.0), (2.0, 4.0)])
def test_ahbf_equals_authors_code(tiny_resnet, lambdas):
    model, okd = _branched(tiny_resnet, "ahbf", lambdas=lambdas, aux=1)
    assert_matches_authors(model, okd, authors_ahbf, lambdas=lambdas)


def test_ahbf_without_own_ta_term_equals_the_papers_eq_11(tiny_resnet):
    model, okd = _branched(tiny_resnet, "ahbf", lambdas=(4.0, 2.0), own_ta=False, aux=1)
    assert_matches_authors(model, okd, authors_ahbf, lambdas=(4.0, 2.0), own_ta=False)


@pytest.mark.parametrize("name", ["tsa", "u_tsa"])
def test_tsa_equals_its_documented_formula(tiny_resnet, name):
    assert_matches_authors(*_branched(tiny_resnet, name), documented_tsa)


def test_dml_equals_pairwise_dml(tiny_resnet):
    assert_matches_authors(*_branched(tiny_resnet, "dml", branches=3), dml_pairwise)


def test_dml_peer_mean_equals_okddips_dml(tiny_resnet):
    assert_matches_authors(*_branched(tiny_resnet, "dml", branches=4, ensemble="peer_mean"), okddip_dml)


def test_md_loss_is_eq_9_without_t_squared():
    """MD (paper 003, Eq. 9; no public code): ``alpha CE + beta KL(S_e || softmax(z / t))``."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 5, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, 5, (8,), generator=g)
    s_e = torch.softmax(torch.randn(8, 5, dtype=torch.float64, generator=g) / 3, -1)
    phase = IntervalSchedule(2, 4)(4)  # r = 2: alpha 0.5, beta 1.5
    ours = md_loss(z, y, s_e, phase, temperature=3.0).total
    theirs = 0.5 * ce(z, y) + 1.5 * (s_e * (s_e.log() - F.log_softmax(z / 3, 1))).sum(1).mean()
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.autograd.grad(ours, z)[0], torch.autograd.grad(theirs, z)[0], rtol=1e-10, atol=0)
    with_t2 = md_loss(z, y, s_e, phase, temperature=3.0, kd_t2=True).total
    torch.testing.assert_close(with_t2 - 0.5 * ce(z, y), 9 * (theirs - 0.5 * ce(z, y)), rtol=1e-10, atol=0)
