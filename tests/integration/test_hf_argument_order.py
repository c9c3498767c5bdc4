"""branchify_hf takes bf.method's order, branchify_hf(method, model), and still the former
branchify_hf(model, method): the same model either way."""
from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")

from branchify.integrations.hf import branchify_hf  # noqa: E402
from hf_tiny_models import make_batch, make_model  # noqa: E402

SPLIT = "bert.encoder.layer.1"


def _build(*args, **kw):
    torch.manual_seed(1)  # the replicas' init draws from torch's RNG
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return branchify_hf(*args, split=SPLIT, **kw)


def _same(a, b) -> None:
    assert a.branched.spec == b.branched.spec and type(a.branched.aggregator) is type(b.branched.aggregator)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    batch = make_batch("bert", batch=2, seed=3)
    for m in (a, b):
        m.eval(), m.okd.set_epoch(1, 3)
    torch.testing.assert_close(a(**batch).loss, b(**batch).loss, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["one", "dml"])
def test_both_argument_orders_build_the_same_model(method):
    preferred = _build(method, make_model("bert"), branches=3)
    assert preferred.branched.num_leaves == 3 and preferred.branched.spec.splits == [SPLIT]
    _same(preferred, _build(make_model("bert"), method, branches=3))          # the former order
    _same(preferred, _build(make_model("bert"), method=method, branches=3))   # the former keyword
    _same(preferred, _build(method=method, model=make_model("bert"), branches=3))


def test_the_method_defaults_to_one_and_wrong_arguments_say_what_is_expected():
    assert type(_build(make_model("bert")).branched.aggregator).__name__ == "Gate"
    with pytest.raises(TypeError, match=r"needs the model \(an nn.Module\)"):
        branchify_hf("one")
    with pytest.raises(TypeError, match="pass one method name"):
        branchify_hf("one", "tsa", model=make_model("bert"))
    with pytest.raises(TypeError, match="pass one method name"):
        branchify_hf(3, make_model("bert"))
    with pytest.raises(TypeError, match="got 3 positional arguments"):
        branchify_hf("one", make_model("bert"), "tsa")
