"""The method registry: names, overrides, default split detection and each preset's template."""
import pytest
import torch
import torchvision
from torch import nn

from branchify.aggregators import Gate, HierarchicalTA, Mean, Pairwise, PeerAttention, PeerMean
from branchify.methods import (MethodError, available_methods, default_splits, get_preset, method, method_options,
                               register_method)


def _build(name, model, **overrides):
    built = get_preset(name).build(model, method_options(name, **overrides))
    return built.spec, built.aggregator, built.loss_kwargs


def test_registry_names_and_aliases():
    assert available_methods() == ["ahbf", "cl_ilr", "dml", "kdcl", "okddip", "okdph", "one", "pcl", "tsa", "u_tsa"]
    assert get_preset("U-TSA").name == "u_tsa" and get_preset("CL-ILR").name == "cl_ilr"
    with pytest.raises(MethodError, match=r"available methods: \['ahbf'"):
        get_preset("kd")
    with pytest.raises(MethodError, match="already registered"):
        register_method(get_preset("one"))


def test_former_module_path_is_the_preset_table_itself():
    # branchify.methods.registry was renamed presets.py; the old path must give the same module, so a
    # preset registered through either is seen by both (one table, not a copy of it).
    import branchify.methods.presets as presets
    import branchify.methods.registry as former
    from branchify.methods import registry as former_from
    from branchify.methods.registry import MethodError as FormerError
    from branchify.methods.registry import register_method as former_register

    assert former is presets and former_from is presets
    assert former_register is register_method is presets.register_method
    assert former.resolve is presets.resolve and former.apply_model_options is presets.apply_model_options
    assert FormerError is MethodError and former._REGISTRY is presets._REGISTRY
    with pytest.raises(MethodError, match="already registered"):
        former_register(get_preset("one"))


def test_unknown_override_lists_every_valid_option_and_the_nearest(tiny_resnet):
    with pytest.raises(MethodError, match=r"does not take \['gate'\]\nvalid options: batched, branches, .*model_fn"):
        method("one", tiny_resnet(), gate=True)
    with pytest.raises(MethodError, match=r"does not take \['brnches'\]; did you mean 'branches'\?"):
        method("one", tiny_resnet(), brnches=2)
    with pytest.raises(MethodError, match=r"unknown method 'onee'; did you mean 'one'\?"):
        method("onee", tiny_resnet())
    with pytest.raises(MethodError, match="split= or splits="):
        method("one", tiny_resnet(), split="layer3", splits=["layer3"])
    assert method("tsa", tiny_resnet(), splits=["layer2", "layer3"])[0].spec.splits == ["layer2", "layer3"]


def test_default_splits_for_known_families(tiny_resnet):
    tv = torchvision.models.resnet18()
    assert default_splits(tv, 1).splits == ["layer4"] and default_splits(tv, 2).splits == ["layer3", "layer4"]
    cifar = tiny_resnet()
    assert default_splits(cifar, 1).splits == ["layer3"] and default_splits(cifar, 2).splits == ["layer2", "layer3"]


def test_any_model_gets_a_default_split_by_the_stated_rule():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))  # no repeated blocks: top-level children
    model, _ = method("one", mlp)
    assert model.spec.splits == ["2"] and "the top level has 3 blocks" in model.split_reason
    assert "default split ['2']" in model.describe(torch.randn(2, 4), print_fn=None)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=6, num_heads=2,
                                               hidden_dim=16, mlp_dim=32)
    assert method("tsa", vit)[0].spec.splits == ["encoder.layers.encoder_layer_2", "encoder.layers.encoder_layer_4"]
    with pytest.raises(MethodError, match=r"too few for a 2-level tree; pass split="):
        method("tsa", nn.Sequential(nn.Linear(4, 3)))

def test_preset_templates(tiny_resnet):
    net = tiny_resnet()
    spec, agg, kw = _build("one", net)
    assert (spec.splits, spec.fanout, isinstance(agg, Gate), agg.detach) == (["layer3"], [3], True, True)
    assert kw["temperature"] == 3.0 and kw["ramp"] == pytest.approx(80 / 300) and kw["detach"] is None
    spec, agg, kw = _build("cl_ilr", net)
    assert isinstance(agg, PeerMean) and not agg.detach and spec.grad_scale == {"layer3": pytest.approx(1 / 3)}
    assert isinstance(_build("cl_ilr", net, ensemble="mean")[1], Mean)
    assert _build("okddip", net, leader=None)[1].leader is None
    spec, agg, kw = _build("okddip", net, target=2)
    assert isinstance(agg, PeerAttention) and agg.leader == "target" and not agg.detach
    assert spec.fanout == [4] and spec.target == 2
    spec, agg, kw = _build("tsa", net)
    assert (spec.splits, spec.fanout, isinstance(agg, Pairwise)) == (["layer2", "layer3"], [2, 2], True)
    assert (kw["ce_weight"], kw["kd_weight"], kw["temperature"], kw["ramp"]) == (0.5, 0.5, 3.0, None)
    assert _build("tsa", net, branches=3)[0].fanout == [3, 3]
    assert _build("tsa", net, alpha=0.2)[2]["kd_weight"] == 0.2
    assert _build("u_tsa", net)[0].fanout == [2, [3, 1]]
    spec, agg, kw = _build("ahbf", net)
    assert isinstance(agg, HierarchicalTA) and agg.own_ta and agg.lambdas == (1.0, 1.0) and kw["ramp"] == 1.0
    assert spec.deepen == {"layer3": [0, 4, 8, 12]} and spec.deepen_init == "identity"
    assert _build("ahbf", torchvision.models.resnet18())[0].deepen == {"layer4": [0, 2, 4, 6]}
    spec, agg, kw = _build("dml", net)
    assert (spec.splits, spec.fanout, kw["temperature"], kw["ramp"]) == (["<input>"], [2], 1.0, None)
    assert isinstance(agg, Pairwise) and isinstance(_build("dml", net, ensemble="peer_mean")[1], PeerMean)


def test_override_validation(tiny_resnet):
    with pytest.raises(MethodError, match="branches"):
        _build("one", tiny_resnet(), branches=0)
    with pytest.raises(MethodError, match="needs 2"):
        _build("u_tsa", tiny_resnet(), split=["layer3"])
    with pytest.raises(MethodError, match="alpha"):
        _build("tsa", tiny_resnet(), alpha=1.5)
    with pytest.raises(MethodError, match="ensemble='self' is unknown; choose 'peer_mean'.*'mean'"):
        _build("cl_ilr", tiny_resnet(), ensemble="self")
    with pytest.raises(MethodError, match="ensemble='mean' is unknown; choose 'pairwise'.*'peer_mean'"):
        _build("dml", tiny_resnet(), ensemble="mean")
    with pytest.raises(MethodError, match="leader=2: pass 'target'"):
        _build("okddip", tiny_resnet(), leader=2)
    assert _build("one", tiny_resnet(), split="layer2")[0].splits == ["layer2"]
