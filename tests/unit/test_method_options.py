"""Typed method options: one frozen dataclass per preset (the former defaults, every field documented),
builders that read them and return their choices, and the renamed variant switches."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import warnings

import pytest
import torch
from torch import nn

import branchify as bf
from branchify.aggregators import Mean, Pairwise, PeerMean
from branchify.methods import (Built, CommonOptions, MethodError, Preset, available_methods, get_preset,
                               method_options, resolve)
from branchify.methods.options import option_defaults
from branchify.methods.pcl import PCLRamp

COMMON = {"split": None, "target": 0, "init": "auto", "temperature": 3.0, "ramp": None, "ce_weight": 1.0,
          "kd_weight": 1.0, "detach": None, "teacher": None, "teacher_weight": 1.0, "teacher_temperature": None}

# The preset modules' DEFAULTS dicts as they stood before the options became dataclasses.
FORMER_DEFAULTS = {
    "one": {**COMMON, "branches": 3, "ramp": 80 / 300},
    "dml": {**COMMON, "branches": 2, "temperature": 1.0, "ensemble": "pairwise"},  # was kd="pairwise"
    "cl_ilr": {**COMMON, "branches": 3, "ramp": 80 / 300, "rescale": True, "ensemble": "peer_mean"},  # mean="others"
    "okddip": {**COMMON, "branches": 4, "ramp": 80 / 300, "space": "logits", "proj_dim": None, "leader": "target"},
    "tsa": {**COMMON, "branches": 2, "fanout": None, "alpha": 0.5, "ce_weight": None, "kd_weight": None},
    "u_tsa": {**COMMON, "branches": 2, "fanout": [2, [3, 1]], "alpha": 0.5, "ce_weight": None, "kd_weight": None},
    "ahbf": {**COMMON, "branches": 4, "ramp": 1.0, "aux": "auto", "deepen": None, "deepen_container": None,
             "lambdas": (1.0, 1.0), "own_ta": True, "deepen_init": "identity"},
    "kdcl": {**COMMON, "branches": 2, "temperature": 4.0, "alpha": 0.5, "ce_weight": None, "kd_weight": None,
             "ensemble": "mean", "weights": None},
    "okdph": {**COMMON, "branches": 2, "init": "copy", "temperature": 4.0, "omega": 0.8, "beta": 0.8, "gamma": 0.5,
              "coefficients": "mean", "fuse_every": "1_epoch", "hybrid_grad": False, "ce_weight": None,
              "kd_weight": None},
}


def _net() -> nn.Module:
    from conftest import TinyCifarResNet

    return TinyCifarResNet()


def test_every_preset_has_a_frozen_options_dataclass_with_the_former_defaults():
    for name in available_methods():
        cls = get_preset(name).options_type
        assert dataclasses.is_dataclass(cls) and issubclass(cls, CommonOptions), name
        assert cls.__dataclass_params__.frozen, name
        defaults = get_preset(name).defaults
        if name == "pcl":
            assert isinstance(defaults.pop("ramp"), PCLRamp)
            assert defaults == {k: v for k, v in {**COMMON, "branches": 3, "ema_decay": 0.999, "ema_warmup": True,
                                                  "peer_mean": "others", "deploy": "temporal"}.items() if k != "ramp"}
        else:
            assert defaults == FORMER_DEFAULTS[name], name
        assert type(method_options(name)) is cls
    assert option_defaults(CommonOptions) == COMMON == bf.methods.COMMON


def _documented_fields(cls: type) -> dict[str, bool]:
    """Each field declared in ``cls``'s own body -> whether a string literal follows it."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    out = {}
    for i, node in enumerate(body):
        if isinstance(node, ast.AnnAssign):
            nxt = body[i + 1] if i + 1 < len(body) else None
            out[node.target.id] = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and \
                isinstance(nxt.value.value, str)
    return out


def test_every_option_is_documented_where_it_is_declared():
    classes = {get_preset(n).options_type for n in available_methods()} | {CommonOptions}
    for cls in classes:
        documented = _documented_fields(cls)
        assert documented and all(documented.values()), f"{cls.__name__}: undocumented {documented}"
    for cls in classes:  # every option of every preset is documented by its own class or a base
        names = set()
        for base in cls.__mro__:
            if dataclasses.is_dataclass(base):
                names |= set(_documented_fields(base))
        assert {f.name for f in dataclasses.fields(cls)} <= names, cls.__name__


def test_options_are_checked_and_never_written_to():
    o = method_options("one", branches=5)
    assert (o.branches, o.temperature, o.ramp) == (5, 3.0, pytest.approx(80 / 300))
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.branches = 2
    with pytest.raises(MethodError, match=r"method 'one' does not take \['brnches'\]; did you mean 'branches'\?\n"
                                          r"valid options: branches, ce_weight, detach"):
        method_options("one", brnches=2)
    assert method_options("tsa", splits=["layer2", "layer3"]).split == ["layer2", "layer3"]
    for name in available_methods():
        options = method_options(name, init="auto")  # OKDPH at init='auto': no warning about identical students
        before = dict(vars(options))
        built = get_preset(name).build(_net(), options, None)
        assert isinstance(built, Built) and vars(options).keys() == before.keys(), name  # nothing added
        assert all(vars(options)[k] is v for k, v in before.items()), name  # nothing replaced


def test_builders_return_their_choices():
    net = _net()
    built = get_preset("one").build(net, method_options("one"), None)
    assert built.spec.splits == ["layer3"] and built.default_split.splits == ["layer3"]
    assert built.traced_copy() is built.default_split.traced is not None and built.setup == ()
    assert "default split ['layer3']" in built.default_split.reason
    given = get_preset("one").build(net, method_options("one", split="layer2"), None)
    assert given.default_split is None and given.traced_copy() is None
    # AHBF with a given split still reads the body from a trace, and branchify() cuts that copy
    ahbf = get_preset("ahbf").build(net, method_options("ahbf", split="layer3"), None)
    assert ahbf.default_split is None and ahbf.traced is not None and ahbf.spec.deepen == {"layer3": [0, 4, 8, 12]}
    r = resolve("ahbf", net, {"split": "layer3"})
    assert r.split_reason is None and r.branchify_kwargs["traced"] is not None
    assert len(get_preset("pcl").build(net, method_options("pcl"), None).setup) == 1
    assert len(get_preset("okdph").build(net, method_options("okdph"), None).setup) == 1


def test_a_preset_registered_with_a_dict_of_defaults_gets_an_options_class():
    one = get_preset("one")
    five = Preset("one_five", "ONE, 5 leaves", {**one.defaults, "branches": 5}, one.build)
    assert dataclasses.is_dataclass(five.options_type) and five.defaults == {**one.defaults, "branches": 5}
    built = five.build(_net(), five.options_type(temperature=2.0), None)
    assert built.spec.fanout == [5] and built.loss_kwargs["temperature"] == 2.0
    with pytest.raises(MethodError, match="options_type must be a dataclass"):
        Preset("bad", "bad", 3, one.build)


@pytest.mark.parametrize("name, old, value, new, expected", [
    ("dml", "kd", "peer_mean", "peer_mean", PeerMean),
    ("dml", "kd", "pairwise", "pairwise", Pairwise),
    ("cl_ilr", "mean", "all", "mean", Mean),
    ("cl_ilr", "mean", "others", "peer_mean", PeerMean),
])
def test_former_variant_switch_names_still_work_with_a_deprecation_warning(name, old, value, new, expected):
    with pytest.warns(DeprecationWarning, match=rf"the option {old}= is now ensemble=; pass ensemble='{new}'") as w:
        bm, _ = bf.method(name, _net(), **{old: value})
    assert [r.filename for r in w if r.category is DeprecationWarning] == [__file__]  # points at the caller
    assert type(bm.aggregator) is expected
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bm, _ = bf.method(name, _net(), ensemble=new)
    assert type(bm.aggregator) is expected
    with pytest.warns(DeprecationWarning):
        assert method_options(name, **{old: value}).ensemble == new
    with pytest.raises(MethodError, match=rf"give ensemble= \({old}= is its former name\), not both"):
        bf.method(name, _net(), ensemble=new, **{old: value})


def test_the_renamed_presets_train_the_same_under_either_name():
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    losses = []
    for kw in ({"mean": "all"}, {"ensemble": "mean"}):
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            bm, okd = bf.method("cl_ilr", _net(), **kw)
        okd.set_epoch(1, 3)
        losses.append(okd(bm(x), y).total)
    assert torch.equal(losses[0], losses[1])


def test_one_ensemble_value_names_one_aggregator_in_every_preset_and_in_codistillation():
    import sys

    from branchify.aggregators import MinLogit, WeightedMean
    from branchify.distributed.codistill import AGGREGATORS, _aggregator
    from branchify.methods.common import ENSEMBLE, ensemble

    by_hand = {"pairwise": Pairwise, "peer_mean": PeerMean, "mean": Mean, "linear": WeightedMean,
               "min_logit": MinLogit}
    assert ENSEMBLE == by_hand
    offering = [n for n in available_methods() if "ensemble" in get_preset(n).defaults]
    assert offering == ["cl_ilr", "dml", "kdcl"]
    for name in offering:
        preset = get_preset(name)
        offered = sys.modules[preset.build.__module__].ENSEMBLES
        assert set(offered) <= set(by_hand), name
        for value in offered:
            extra = {"weights": [1.0, 1.0]} if value == "linear" else {}
            built = preset.build(_net(), method_options(name, ensemble=value, **extra), None)
            assert type(built.aggregator) is by_hand[value], (name, value)
    assert {a: type(_aggregator(a)) for a in AGGREGATORS} == {a: by_hand[a] for a in AGGREGATORS}
    # a preset cannot offer a value the table does not name (or give a name a second meaning)
    with pytest.raises(MethodError, match=r"ensemble values \['mine'\] name no aggregator .*pairwise, peer_mean"):
        ensemble(method_options("dml"), {"pairwise": "DML", "mine": "something else"})
