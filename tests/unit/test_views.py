"""Per-leaf input views (branchify.views): each leaf runs on its own view, the default path is untouched."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import branchify as bf
import branchify.model
from branchify.describe import segment_flops
from branchify.views import ViewError, crop_flip, stacked


def _tree(tiny_resnet, splits=("layer3",), fanout=(3,)):
    torch.manual_seed(0)
    return bf.branchify(tiny_resnet(num_classes=5), bf.Spec(splits=list(splits), fanout=list(fanout))).double()


def _shift(x, k):
    return x + 0.5 * k


def test_every_leaf_runs_on_its_own_view(tiny_resnet, one_thread):
    """Leaf k of the views forward equals leaf k of a plain forward on view k (train mode: BN batch
    statistics of that view in the trunk too, as PCL's per-peer extract(x_k))."""
    bm = _tree(tiny_resnet).train()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    bm.set_views(_shift)
    out = bm(x)
    plain = copy.deepcopy(bm)
    plain.set_views(None)
    for k in range(3):
        ref = plain(_shift(x, k))
        torch.testing.assert_close(out.logits[k], ref.logits[k], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.features[k], ref.features[k], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.cuts[()], plain(_shift(x, 0)).cuts[()])  # cuts: the first leaf's view


def test_gradients_of_the_trunk_sum_over_the_views(tiny_resnet, one_thread):
    bm = _tree(tiny_resnet).train()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    bm.set_views(_shift)
    sum(z.sum() for z in bm(x).logits).backward()
    got = bm.segments["trunk"].get_submodule("conv1").weight.grad.clone()
    plain = copy.deepcopy(bm)
    plain.set_views(None)
    plain.zero_grad()
    for k in range(3):
        plain(_shift(x, k)).logits[k].sum().backward()
    torch.testing.assert_close(got, plain.segments["trunk"].get_submodule("conv1").weight.grad, rtol=1e-10, atol=1e-12)


def test_multi_level_tree_paths_and_cuts(tiny_resnet, one_thread):
    bm = _tree(tiny_resnet, splits=("layer2", "layer3"), fanout=(2, 2)).train()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    bm.set_views(_shift)
    out = bm(x)
    plain = copy.deepcopy(bm)
    plain.set_views(None)
    for k in range(4):
        torch.testing.assert_close(out.logits[k], plain(_shift(x, k)).logits[k], rtol=1e-12, atol=1e-12)
    assert sorted(out.cuts) == [(), (0,), (1,)]
    torch.testing.assert_close(out.cuts[(1,)], plain(_shift(x, 2)).cuts[(1,)])  # leaf 2 is the first under (1,)


def test_default_path_is_unchanged_and_never_touches_views(tiny_resnet, one_thread, monkeypatch):
    bm = _tree(tiny_resnet).train()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    before = copy.deepcopy(bm)(x)

    def boom(*a, **k):
        raise AssertionError("run_views ran without views")

    monkeypatch.setattr(branchify.model, "run_views", boom)
    bm.set_views(_shift)
    bm.set_views(None)
    after = bm(x)
    for a, b in zip(before.logits + before.features, after.logits + after.features):
        assert torch.equal(a, b)


def test_eval_mode_ignores_views(tiny_resnet, one_thread):
    bm = _tree(tiny_resnet).eval()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    ref = bm(x)
    bm.set_views(lambda x, k: x * 0)
    out = bm(x)
    assert all(torch.equal(a, b) for a, b in zip(ref.logits, out.logits))


def test_the_owner_draws_fresh_views_and_a_copy_reuses_them(tiny_resnet, one_thread):
    bm = _tree(tiny_resnet).train()
    seen = []
    bm.set_views(lambda x, k: seen.append(k) or x + torch.randn_like(x))
    copy_ = copy.deepcopy(bm)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    out = bm(x)
    assert seen == [0, 1, 2]
    assert torch.equal(copy_(x).logits[1], out.logits[1])  # same views: an EMA copy sees the live leaves' inputs
    assert seen == [0, 1, 2]
    assert not torch.equal(bm(x).logits[1], out.logits[1])  # the model itself draws again
    assert seen == [0, 1, 2] * 2


def test_a_model_with_views_pickles(tiny_resnet, one_thread, tmp_path):
    bm = _tree(tiny_resnet).train()
    bm.set_views(stacked())
    bm(torch.randn(2, 3, 3, 16, 16, dtype=torch.float64))  # the owner now holds its last views
    torch.save(bm, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    xs = torch.randn(2, 3, 3, 16, 16, dtype=torch.float64)
    assert torch.equal(loaded(xs).logits[2], bm(xs).logits[2])


def test_cohort_peers_get_their_own_views(one_thread):
    torch.manual_seed(0)
    peers = [nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)) for _ in range(2)]
    cohort = bf.Cohort(peers).train()
    cohort.set_views(lambda x, k: x * (k + 2))
    x = torch.randn(5, 6)
    out = cohort(x)
    for k in range(2):
        torch.testing.assert_close(out.logits[k], peers[k](x * (k + 2)))
    assert cohort.views is not None and torch.equal(cohort.eval()(x).logits[1], peers[1](x))


def test_method_option_and_describe_cost(tiny_resnet, one_thread):
    bm, _ = bf.method("one", tiny_resnet(num_classes=5), views=_shift)
    assert bm.views is _shift
    text = bm.describe(torch.randn(2, 3, 16, 16), print_fn=None)
    line = [ln for ln in text.splitlines() if ln.startswith("per-leaf views")][0]
    flops = segment_flops(bm, torch.randn(2, 3, 16, 16))
    with_views = 3 * flops["trunk"] + sum(flops[f"b{k}"] for k in range(3))
    assert with_views > sum(flops.values())
    assert f"({with_views / sum(flops.values()):.2f}x the tree without views, " in line
    assert f"{with_views / (flops['trunk'] + flops['b0']):.2f}x the original model)" in line


def test_bad_views_are_explained(tiny_resnet, one_thread):
    bm = _tree(tiny_resnet).train()
    with pytest.raises(ViewError, match="callable views"):
        bm.set_views("flip")
    with pytest.raises(ViewError, match="callable views"):
        bf.method("one", tiny_resnet(num_classes=5), views=3)
    bm.set_views(lambda x, k: x[:2])
    with pytest.raises(ViewError, match="keep the batch"):
        bm(torch.randn(4, 3, 16, 16, dtype=torch.float64))
    bm.set_views(lambda x, k: [x])
    with pytest.raises(ViewError, match="must return leaf 0's input tensor"):
        bm(torch.randn(4, 3, 16, 16, dtype=torch.float64))
    with pytest.raises(ViewError, match="at least 3 views"):
        stacked()(torch.randn(4, 2, 3), 2)


def test_stacked_views_feed_leaf_k_its_slice(tiny_resnet, one_thread):
    bm = _tree(tiny_resnet).train()
    bm.set_views(stacked())
    xs = torch.randn(4, 3, 3, 16, 16, dtype=torch.float64)
    out = bm(xs)
    plain = copy.deepcopy(bm)
    plain.set_views(None)
    torch.testing.assert_close(out.logits[2], plain(xs[:, 2]).logits[2], rtol=1e-12, atol=1e-12)


def test_crop_flip_is_a_crop_of_the_padded_image_or_its_mirror():
    torch.manual_seed(0)
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    assert torch.equal(crop_flip(0, flip=False)(x, 0), x)
    mirrored = crop_flip(0)(x, 1)
    assert all(torch.equal(m, s) or torch.equal(m, s.flip(-1)) for m, s in zip(mirrored, x))
    padded = nn.functional.pad(x, (2,) * 4)
    v = crop_flip(2, flip=False)(x, 0)
    for i in range(2):
        assert any(torch.equal(v[i], padded[i, :, dy:dy + 6, dx:dx + 6]) for dy in range(5) for dx in range(5))
    with pytest.raises(ViewError, match=r"\[B, C, H, W\]"):
        crop_flip()(torch.randn(3, 4), 0)


def test_crop_flip_fill_pads_with_the_given_value_like_a_crop_of_raw_pixels_before_normalising():
    torch.manual_seed(1)
    raw = torch.rand(64, 1, 5, 5)
    mean, std = 0.3, 0.2
    views = crop_flip(2, flip=False, fill=-mean / std)((raw - mean) / std, 0)
    padded = nn.functional.pad(raw, (2,) * 4)  # zero (black) pixels, then normalised
    for i in range(64):
        assert any(torch.allclose(views[i] * std + mean, padded[i, :, dy:dy + 5, dx:dx + 5], atol=1e-6)
                   for dy in range(5) for dx in range(5))
    assert (views * std + mean).abs().min() < 1e-6  # some crop reached into the padding
