"""A model without ``split=`` is copied and traced once: the default split's traced copy is what
``branchify()`` cuts (``DefaultSplits.traced`` -> ``branchify(..., traced=)``), with the same result."""
from __future__ import annotations

import pytest
import torch
from conftest import TinyCifarResNet

import branchify as bf
import branchify.surgery.tracing as tracing
from branchify.methods import default_splits


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return TinyCifarResNet()


@pytest.fixture
def trace_calls(monkeypatch):
    calls = []
    real = tracing.trace

    def counting(model, *args, **kwargs):
        calls.append(type(model).__name__)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(tracing, "trace", counting)
    return calls


@pytest.mark.parametrize("name, levels", [("one", 1), ("tsa", 2)])
def test_default_split_model_is_traced_once_and_built_as_with_explicit_split(trace_calls, name, levels):
    net = _net()
    torch.manual_seed(1)
    bm, _ = bf.method(name, net)
    assert trace_calls == ["TinyCifarResNet"]  # the default split's trace; branchify() cuts that copy
    splits = default_splits(net, levels).splits
    assert bm.spec.splits == splits and bm.split_reason.startswith("default split")
    torch.manual_seed(1)
    explicit, _ = bf.method(name, net, split=splits if levels > 1 else splits[0])
    assert len(trace_calls) == 3  # default_splits above, then the explicit split's own copy
    got, want = bm.state_dict(), explicit.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    x = torch.randn(2, 3, 32, 32)
    bm.eval(), explicit.eval()
    assert all(torch.equal(a, b) for a, b in zip(bm(x).logits, explicit(x).logits))


def test_traced_copy_of_another_model_or_tracer_is_refused():
    net = _net()
    spec = bf.Spec(splits=["layer3"], fanout=[2])
    other = tracing.traced_copy(_net())
    with pytest.raises(bf.TraceError, match="copy of another model or was traced with another tracer"):
        bf.branchify(net, spec, traced=other)
    with pytest.raises(bf.TraceError, match="traced_copy\\(model, tracer\\)"):
        bf.branchify(net, spec, traced=tracing.traced_copy(net), tracer=bf.Tracer())
    mine = tracing.traced_copy(net)
    bm = bf.branchify(net, spec, traced=mine)
    assert bm.segments["b1"] is not None and mine.work is not net


def test_explicit_split_leaves_no_traced_copy():
    from branchify.methods.presets import resolve

    assert "traced" not in resolve("one", _net(), {"split": "layer3"}).branchify_kwargs
    assert resolve("one", _net(), {}).branchify_kwargs["traced"].graph is not None
