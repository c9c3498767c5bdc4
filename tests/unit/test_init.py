"""Replica initialisation: never silently identical, the architecture's own init when possible."""
from __future__ import annotations

import pytest
import torch
from torchvision import models as tvm

import branchify as bf
from branchify import Spec


def _params(module):
    return {k: v for k, v in module.state_dict().items()}


def test_auto_without_model_fn_shuffles_keeping_each_tensors_values():
    torch.manual_seed(0)
    bm = bf.branchify(tvm.resnet18(num_classes=4), Spec(splits=["layer4"], fanout=[2]))
    assert bm.init_used.startswith("shuffle")
    a, b = _params(bm.segments["b0"]), _params(bm.segments["b1"])
    w0, w1 = a["layer4.0.conv1.weight"], b["layer4.0.conv1.weight"]
    assert not torch.equal(w0, w1)
    torch.testing.assert_close(w0.flatten().sort().values, w1.flatten().sort().values)


def test_model_fn_is_used_as_a_donor():
    torch.manual_seed(0)
    donors = []

    def model_fn():
        m = tvm.resnet18(num_classes=4)
        donors.append(m)
        return m

    bm = bf.branchify(model_fn(), Spec(splits=["layer4"], fanout=[3]), model_fn=model_fn)
    assert bm.init_used.startswith("donor")
    assert len(donors) == 1 + 2  # the model itself + one donor per re-initialised replica
    for i, donor in zip((1, 2), donors[1:]):
        torch.testing.assert_close(bm.segments[f"b{i}"].state_dict()["fc.weight"], donor.fc.weight)


def test_copy_gives_identical_replicas_and_reset_uses_module_defaults():
    net = tvm.resnet18(num_classes=4)
    bm = bf.branchify(net, Spec(splits=["layer4"], fanout=[2], init="copy"))
    assert all(torch.equal(v, _params(bm.segments["b1"])[k]) for k, v in _params(bm.segments["b0"]).items())
    torch.manual_seed(1)
    bm = bf.branchify(net, Spec(splits=["layer4"], fanout=[2], init="reset"))
    assert not torch.equal(_params(bm.segments["b0"])["fc.weight"], _params(bm.segments["b1"])["fc.weight"])


def test_batchnorm_statistics_are_reset_in_reinitialised_replicas():
    net = tvm.resnet18(num_classes=4)
    net.train()(torch.randn(4, 3, 32, 32))  # give the running stats non-default values
    bm = bf.branchify(net, Spec(splits=["layer4"], fanout=[2]))
    kept = _params(bm.segments["b0"])["layer4.0.bn1.running_mean"]
    fresh = _params(bm.segments["b1"])["layer4.0.bn1.running_mean"]
    assert kept.abs().sum() > 0 and torch.equal(fresh, torch.zeros_like(fresh))


@pytest.mark.parametrize("how", ["shuffle", "reset", "copy"])
def test_describe_names_the_init(how):
    bm = bf.branchify(tvm.resnet18(num_classes=4), Spec(splits=["layer4"], fanout=[2], init=how))
    assert f"replica init: {how}" in bm.describe(torch.randn(2, 3, 32, 32), print_fn=None)


def test_a_model_fn_that_reseeds_makes_identical_replicas_and_branchify_warns():
    def seeded():
        torch.manual_seed(0)  # the mistake: every donor is the same network
        return tvm.resnet18(num_classes=4)

    with pytest.warns(UserWarning, match=r"replica b1 starts with exactly the weights of b0"):
        bf.branchify(seeded(), Spec(splits=["layer4"], fanout=[2]), model_fn=seeded)
