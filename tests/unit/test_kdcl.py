"""KDCL: the preset's loss equals the re-implementations' code in float64; views, ensembles, stability, export."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import branchify as bf
from branchify.aggregators import Mean, MinLogit, WeightedMean, fit_ensemble_weights
from branchify.methods import MethodError
from branchify.outputs import with_labels
from branchify.recipes.zoo import resnet20
from branchify.views import stacked

RTOL = 1e-5


def kdcl_reference(out, y, T=4.0, alpha=0.5, weights=None, min_logit=False):
    """``tianlizhang/OKDPH@a562089`` ``src/03_KDCL.py`` lines 44-54 (= ``shaoeric/Online-Knowledge-Distillation-
    via-Collaborative-Learning@1ba5461`` ``train.py`` lines 74-85): ``stable_out = mean(out_list).detach()``;
    per network ``(1 - alpha) * F.cross_entropy + alpha * T^2 * F.kl_div(log_softmax(out/T), softmax(stable/T),
    'batchmean')``; each network steps on its own loss, so the total is their sum. ``weights``: KDCL-Linear;
    ``min_logit``: the paper's KDCL-MinLogit, ``stable[c] = min_k (z_k[c] - z_k[y])`` (no public code)."""
    z = torch.stack(list(out.logits))
    w = torch.full((len(z),), 1.0 / len(z), dtype=z.dtype) if weights is None else torch.tensor(weights, dtype=z.dtype)
    stable = (w.view(-1, 1, 1) * z).sum(0).detach()
    if min_logit:
        rows = torch.arange(len(y))
        stable = torch.stack([zk - zk[rows, y][:, None] for zk in z]).min(0).values.detach()
    total = 0
    for zk in out.logits:
        ce = F.cross_entropy(zk, y)
        p = F.softmax(stable / T, dim=1)
        div = (p * (p.log() - F.log_softmax(zk / T, dim=1))).sum() / zk.shape[0] * T * T
        total = total + (1 - alpha) * ce + alpha * div
    return total


def _check(model, okd, x, y, **ref_kw):
    out = model(x)
    ours = okd(out, y).total
    theirs = kdcl_reference(out, y, **ref_kw)
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=0)
    g_ours = torch.autograd.grad(ours, out.logits, retain_graph=True)
    g_theirs = torch.autograd.grad(theirs, out.logits)
    scale = max(float(g.abs().max()) for g in g_theirs)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=RTOL * scale)


@pytest.mark.parametrize("branches", [2, 3])
def test_kdcl_equals_the_reference_code(tiny_resnet, one_thread, branches):
    torch.manual_seed(0)
    model, okd = bf.method("kdcl", tiny_resnet(num_classes=5), branches=branches,
                           model_fn=lambda: tiny_resnet(num_classes=5))
    assert model.spec.splits == [bf.INPUT] and isinstance(model.aggregator, Mean)
    assert (okd.temperature, okd.ce_weight, okd.kd_weight) == (4.0, 0.5, 0.5)
    model.double().train()
    torch.manual_seed(1)
    xs = torch.randn(6, branches, 3, 16, 16, dtype=torch.float64)  # the references' [B, K, C, H, W] batches
    model.set_views(stacked())
    _check(model, okd, xs, torch.randint(0, 5, (6,)))


def test_each_network_runs_on_its_own_view(tiny_resnet, one_thread):
    torch.manual_seed(0)
    model, _ = bf.method("kdcl", tiny_resnet(num_classes=5), views=stacked())
    model.double().train()
    xs = torch.randn(4, 2, 3, 16, 16, dtype=torch.float64)
    out = model(xs)
    for k in range(2):  # network k alone (no trunk: the "<input>" split) on imgs[:, k]
        net = model.export(k).double().train()
        torch.testing.assert_close(out.logits[k], net(xs[:, k]), rtol=1e-10, atol=1e-12)


def test_linear_ensemble_equals_the_weighted_reference(tiny_resnet, one_thread):
    torch.manual_seed(0)
    model, okd = bf.method("kdcl", tiny_resnet(num_classes=5), ensemble="linear", weights=[3.0, 1.0])
    assert isinstance(model.aggregator, WeightedMean)
    model.double().train()
    _check(model, okd, torch.randn(6, 3, 16, 16, dtype=torch.float64), torch.randint(0, 5, (6,)),
           weights=[0.75, 0.25])


def test_min_logit_ensemble_equals_the_papers_formula(tiny_resnet, one_thread):
    torch.manual_seed(0)
    model, okd = bf.method("kdcl", tiny_resnet(num_classes=5), ensemble="min_logit", branches=3)
    assert isinstance(model.aggregator, MinLogit)
    model.double().train()
    x, y = torch.randn(6, 3, 16, 16, dtype=torch.float64), torch.randint(0, 5, (6,))
    _check(model, okd, x, y, min_logit=True)
    term = model(x).targets.kd[0]
    with pytest.raises(ValueError, match="depends on the labels"):
        okd.term_loss(term)
    teacher = with_labels(model(x).targets, y).kd[0].teacher
    assert torch.equal(teacher.gather(1, y[:, None]), torch.zeros(6, 1, dtype=torch.float64))
    assert bool((teacher <= 0).all())  # the true class on top, by the most cautious margin


def test_fitted_weights_lower_the_held_out_ce():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (64,), generator=g)
    good = F.one_hot(y, 4).double() * 3 + torch.randn(64, 4, generator=g, dtype=torch.float64)
    noisy = torch.randn(64, 4, generator=g, dtype=torch.float64) * 3
    w = fit_ensemble_weights([good, noisy], y)
    assert abs(sum(w) - 1) < 1e-9 and w[0] > w[1]
    mix = w[0] * good + w[1] * noisy
    assert F.cross_entropy(mix, y) < F.cross_entropy((good + noisy) / 2, y)


def test_bad_options_are_explained(tiny_resnet):
    with pytest.raises(MethodError, match="needs weights"):
        bf.method("kdcl", tiny_resnet(num_classes=5), ensemble="linear")
    with pytest.raises(MethodError, match="ensemble='mean' takes none"):
        bf.method("kdcl", tiny_resnet(num_classes=5), weights=[1, 1])
    with pytest.raises(MethodError, match="'mean'"):
        bf.method("kdcl", tiny_resnet(num_classes=5), ensemble="min")
    with pytest.raises(MethodError, match="alpha"):
        bf.method("kdcl", tiny_resnet(num_classes=5), alpha=2.0)


def test_kdcl_trains_stably_on_resnet20_with_views_and_exports_its_target(one_thread):
    torch.manual_seed(0)
    net = resnet20(num_classes=10)
    model, okd = bf.method("kdcl", net, views=bf.views.crop_flip(2), model_fn=lambda: resnet20(num_classes=10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    losses = []
    for _ in range(12):
        loss = okd(model(x), y).total
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    model.eval()
    student = model.export().eval()
    assert type(student) is type(net)
    with torch.no_grad():
        assert torch.equal(student(x), model(x).logits[model.spec.target])
