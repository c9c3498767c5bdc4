"""PCL: the loss equals the reproduction's code in float64; views reach the temporal mean; the EMA is deployed."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import branchify as bf
from branchify.aggregators import AggregatorError, PeerTemporalMean
from branchify.methods import MethodError
from branchify.methods.pcl import PCLRamp
from branchify.recipes.zoo import resnet20

RTOL = 1e-5


# ------------------------------------------------- shaoeric/Peer-Collaborative-Learning-...@6afb473, re-written
def kd_loss(pred, target, T=3.0):
    """``src/losses/kd_loss.py`` lines 15-26: ``KLDivLoss(batchmean)(log_softmax(p/T), softmax(t/T)) * T * T``."""
    p = F.softmax(target / T, dim=1)
    return (p * (p.log() - F.log_softmax(pred / T, dim=1))).sum() / pred.shape[0] * T * T


def pm_loss(pred, targets):
    """``src/losses/kd_loss.py`` lines 35-41: the mean of ``kd_loss(pred, target.detach())`` over the targets."""
    return sum(kd_loss(pred, t.detach()) for t in targets) / len(targets)


def rampup(epoch, lambd=1.0, alpha=80):
    """``src/losses/loss_wrapper.py`` lines 18-22, as written (it divides by ``lambd``, not ``alpha``)."""
    return lambd if epoch > alpha else lambd * math.exp(-5 * (1 - epoch / lambd) ** 2)


def pcl_reference(out, agg, y, epoch):
    """``src/losses/loss_wrapper.py`` lines 37-61 with ``src/controller.py`` lines 39-42 (``en_output.detach()``
    as the ensemble label, the mean model's outputs as ``mean_label``) and ``src/models/resnet.py`` lines
    217-219 (``en_fc`` on ``torch.cat`` of the peer features)."""
    fc = agg.parts["pe"].fc
    pred_en = torch.cat(list(out.features), dim=1) @ fc.weight.T + fc.bias
    en_label, means = pred_en.detach(), out.temporal.logits
    loss = F.cross_entropy(pred_en, y)
    w = rampup(epoch)
    for k, pred in enumerate(out.logits):
        others = [means[j] for j in range(len(means)) if j != k]
        loss = loss + F.cross_entropy(pred, y) + kd_loss(pred, en_label) * w + pm_loss(pred, others) * w
    return loss


def _pcl(tiny_resnet, **kw):
    torch.manual_seed(0)
    model, okd = bf.method("pcl", tiny_resnet(num_classes=5), model_fn=lambda: tiny_resnet(num_classes=5), **kw)
    return model, okd


def _step(model, okd, x, y, opt):
    loss = okd(model(x), y).total
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def test_pcl_equals_the_reproductions_code(tiny_resnet, one_thread):
    model, okd = _pcl(tiny_resnet)
    model.double().train()
    torch.manual_seed(1)
    x, y = torch.randn(6, 3, 16, 16, dtype=torch.float64), torch.randint(0, 5, (6,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    okd.set_epoch(100, 300)
    for _ in range(2):  # the temporal mean now differs from the live peers
        _step(model, okd, x + 0.1 * torch.randn_like(x), y, opt)
    for epoch in (0, 1, 2, 40, 80, 81, 299):
        okd.set_epoch(epoch, 300)
        out = model(x)
        ours, theirs = okd(out, y).total, pcl_reference(out, model.aggregator, y, epoch)
        torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=0, msg=f"epoch {epoch}")
        wrt = list(out.logits) + list(out.features) + list(model.aggregator.parameters())
        g_ours = torch.autograd.grad(ours, wrt, retain_graph=True)
        g_theirs = torch.autograd.grad(theirs, wrt)
        scale = max(float(g.abs().max()) for g in g_theirs)
        for i, (a, b) in enumerate(zip(g_ours, g_theirs)):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=RTOL * scale, msg=f"gradient {i} at epoch {epoch}")
    assert not any(t.requires_grad for t in out.temporal.logits)


def test_ramp_is_the_codes_and_the_papers_is_one_option_away(tiny_resnet):
    ramp = PCLRamp()
    assert [ramp(e, 300) for e in (1, 81, 299)] == [1.0, 1.0, 1.0]
    assert ramp(0, 300) == pytest.approx(math.exp(-5)) and ramp(40, 300) < 1e-100
    assert ramp(10, 3000) == pytest.approx(1.0)  # scaled: epoch 1 of 300 is epoch 10 of 3000
    _, okd = _pcl(tiny_resnet, ramp=80 / 300)
    okd.set_epoch(40, 300)
    assert okd.ramp_value() == pytest.approx(math.exp(-5 * 0.5 ** 2))


def test_the_temporal_mean_runs_on_the_live_peers_views(tiny_resnet, one_thread):
    model, okd = _pcl(tiny_resnet, views=lambda x, k: x + torch.randn_like(x))
    out = model(torch.randn(4, 3, 16, 16))  # no step yet: the EMA copy still equals the live weights
    for k in range(3):
        torch.testing.assert_close(out.temporal.logits[k], out.logits[k].detach(), rtol=0, atol=1e-6)
    later, _ = _pcl(tiny_resnet)
    later.set_views(lambda x, k: x + torch.randn_like(x))  # views set after the copy exists reach it too
    out = later(torch.randn(4, 3, 16, 16))
    torch.testing.assert_close(out.temporal.logits[2], out.logits[2].detach(), rtol=0, atol=1e-6)


def test_the_ema_follows_the_reference_update(tiny_resnet, one_thread):
    model, okd = _pcl(tiny_resnet)
    okd.set_epoch(100, 300)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    name = "segments.b1.fc.weight"
    live = dict(model.named_parameters())[name]
    ema = dict(model.temporal.model.named_parameters())[name]
    _step(model, okd, x, y, opt)
    w1 = live.detach().clone()
    _step(model, okd, x, y, opt)  # this forward applied update 1: a = min(1 - 1/1, 0.999) = 0, a copy
    torch.testing.assert_close(ema, w1, rtol=0, atol=0)
    w2 = live.detach().clone()
    model(x)  # update 2: a = 0.5
    torch.testing.assert_close(ema, 0.5 * w1 + 0.5 * w2, rtol=1e-6, atol=1e-7)


def test_pcl_trains_stably_on_resnet20_and_exports_the_temporal_mean(one_thread):
    torch.manual_seed(0)
    net = resnet20(num_classes=10)
    model, okd = bf.method("pcl", net, views=bf.views.crop_flip(2), model_fn=lambda: resnet20(num_classes=10))
    okd.set_epoch(100, 300)  # past the ramp: every term at full weight
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    losses = [_step(model, okd, x, y, opt) for _ in range(20)]
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < losses[0] and sum(losses[-5:]) < sum(losses[:5]), losses
    model.eval()
    student = model.export().eval()
    assert type(student) is type(net)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(student(x), out.temporal.logits[model.spec.target], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(student(x), out.logits[model.spec.target])  # the EMA, not the live weights


def test_deploy_live_exports_the_trained_weights(tiny_resnet, one_thread):
    model, okd = _pcl(tiny_resnet, deploy="live")
    okd.set_epoch(100, 300)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    _step(model, okd, x, y, torch.optim.SGD(model.parameters(), lr=0.1))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.export().eval()(x), model(x).logits[0])


def test_bad_options_and_missing_temporal_mean_are_explained(tiny_resnet, fake_model, output):
    with pytest.raises(MethodError, match="deploy="):
        _pcl(tiny_resnet, deploy="best")
    with pytest.raises(MethodError, match="decay"):
        _pcl(tiny_resnet, ema_decay=1.5)
    with pytest.raises(MethodError, match="whose"):
        _pcl(tiny_resnet, peer_mean="everyone")
    with pytest.raises(AggregatorError, match="TemporalMean"):
        PeerTemporalMean()(output())
