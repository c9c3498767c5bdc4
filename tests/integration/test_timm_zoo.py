"""A spread of timm architectures through branchify with no user hints: the timm plugin's tracer
(timm's own fx leaf modules and autowrap functions), its replica init (``timm.create_model`` of the
same architecture) and export (a timm model that ``timm.create_model`` + strict ``load_state_dict``
accepts).

Every architecture is built with random weights on small inputs and checked with the default
split of a one-level tree (ONE) and of a two-level tree (TSA: cuts 1/3 and 2/3 through the body):
leaf 0 equals the model at init, the user's model is left exactly as it was (also for LeViT /
EfficientFormer / TinyViT, whose attention caches tensors in eval mode), one training step moves
every segment, and exported leaves reload strictly into a fresh ``timm.create_model`` and
reproduce the branched leaf. A known failure is an ``xfail(strict=True)`` whose reason names the
hint that fixes it, and the hinted variant is run too (it must pass).
"""
from __future__ import annotations

import functools
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import pytest
import torch
from torch import nn

import branchify as bf
from zoo_checks import assert_unchanged, check_branched, check_train_eval, snapshot
from branchify.registry import ENTRY_POINT_GROUP, plugin_for
from branchify.surgery.default_split import default_splits

timm = pytest.importorskip("timm")

from branchify.integrations.timm import (creation_kwargs, optional_inputs, timm_model_fn,  # noqa: E402
                                         timm_tracer)

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: see conftest.one_thread
ATOL = 1e-5
NUM_CLASSES = 10


@dataclass(frozen=True)
class Arch:
    """One zoo entry: ``timm.create_model(name, num_classes=10, **kwargs)`` on ``size``x``size`` images.

    ``xfail``: check (``"one"``, ``"tsa"``, ``"split"`` for the default-split check) -> why it
    fails with the defaults; ``hints``: check -> the ``bf.method`` overrides that fix it.
    """

    name: str
    family: str
    size: int = 64
    kwargs: dict[str, Any] = field(default_factory=dict)
    xfail: dict[str, str] = field(default_factory=dict)
    hints: dict[str, dict[str, Any]] = field(default_factory=dict)
    slow: bool = False
    caches: bool = False  # its forward caches tensors in eval mode (LeViT-style attention biases)


SMALL = {"img_size": 64}
_SWIN_GATE = ("ONE's Gate is sized by cut_channels(), read from the first layer consuming the cut: "
              "the stage's patch merging, which reshapes 2x2 tokens into 4*C channels before its "
              "LayerNorm, so the gate expects 4*C (1536) channels of a C-channel cut")

ZOO: dict[str, Arch] = {a.name: a for a in [
    # CNNs
    Arch("resnet18", "cnn"),
    Arch("resnetv2_18", "cnn"),
    Arch("efficientnet_b0", "cnn"),
    Arch("tf_efficientnetv2_b0", "cnn"),  # TF "same" padding: Conv2dSame (a timm leaf)
    Arch("mobilenetv3_small_050", "cnn"),
    Arch("mobilenetv4_conv_small", "cnn"),
    Arch("regnetx_002", "cnn"),
    Arch("convnext_atto", "cnn"),
    Arch("densenet121", "cnn"),
    Arch("dla46_c", "cnn"),
    Arch("ghostnet_050", "cnn"),
    Arch("hrnet_w18_small", "cnn"),
    Arch("lcnet_050", "cnn"),
    Arch("hgnetv2_b0", "cnn"),
    Arch("nf_regnet_b0", "cnn"),  # ScaledStdConv2d + NormFreeBlock (a timm leaf)
    Arch("test_nfnet", "cnn"),
    Arch("dm_nfnet_f0", "cnn", slow=True),  # 71M parameters
    # ViTs
    Arch("vit_tiny_patch16_224", "vit", kwargs=SMALL),
    Arch("deit_tiny_distilled_patch16_224", "vit", kwargs=SMALL),
    Arch("swin_tiny_patch4_window7_224", "vit", kwargs=SMALL,
         xfail={"one": _SWIN_GATE}, hints={"one": {"split": "layers.3.blocks.0"}}),
    Arch("pit_ti_224", "vit", kwargs=SMALL),
    Arch("xcit_nano_12_p16_224", "vit", kwargs=SMALL),
    Arch("cait_xxs24_224", "vit", kwargs=SMALL),
    Arch("eva02_tiny_patch14_224", "vit", size=56, kwargs={"img_size": 56}),
    Arch("tiny_vit_5m_224", "vit", caches=True),
    Arch("convit_tiny", "vit", kwargs=SMALL),
    Arch("hiera_tiny_224", "vit", kwargs=SMALL),  # forward(x, mask=None): traced with mask=None
    # stages interleaved across four ModuleLists: the body is the patch embeddings that start them
    Arch("twins_svt_small", "vit"),
    # hybrids
    Arch("levit_128s", "hybrid", kwargs=SMALL, caches=True),  # caches attention biases in eval mode
    Arch("efficientformerv2_s0", "hybrid", kwargs=SMALL, caches=True),  # caches attention biases in eval mode
    Arch("efficientformer_l1", "hybrid", size=224, slow=True, caches=True),  # ignores img_size: needs 224
    Arch("mobilevit_xxs", "hybrid"),  # MobileVitBlock (a timm leaf)
    Arch("coatnet_nano_rw_224", "hybrid", kwargs=SMALL),
    Arch("maxvit_nano_rw_256", "hybrid", kwargs=SMALL),
    Arch("edgenext_xx_small", "hybrid"),
    Arch("fastvit_t8", "hybrid"),
    Arch("efficientvit_b0", "hybrid"),  # LiteMLA (a timm leaf)
    Arch("efficientvit_m0", "hybrid", kwargs=SMALL, caches=True),  # caches attention biases in eval mode
    # MLP-mixers
    Arch("mixer_s32_224", "mlp", kwargs=SMALL),
    Arch("resmlp_12_224", "mlp", kwargs=SMALL),
    Arch("gmlp_ti16_224", "mlp", kwargs=SMALL),
]}


CHECKS = ("split", "one", "tsa")

DEFAULT_SUITE = {
    "resnet18", "efficientnet_b0", "tf_efficientnetv2_b0", "nf_regnet_b0", "convnext_atto", "mobilenetv3_small_050",
    "densenet121", "vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "swin_tiny_patch4_window7_224",
    "twins_svt_small", "levit_128s", "mobilevit_xxs", "efficientvit_b0", "mixer_s32_224", "resmlp_12_224",
}
"""One or two architectures per family and every kind of hint the plugin supplies (timm leaves,
Conv2dSame, eval-mode caches, interleaved ModuleLists) run in the default suite (~1 min on two
cores); the rest of the spread is marked slow (``pytest -m slow tests/integration/test_timm_zoo.py``)."""


def _cases() -> list:
    """(architecture, check, hinted) cases, grouped by architecture (its model is built once):
    every check unhinted, plus the hinted variant of each check that has a hint."""
    cases = []
    for name, arch in ZOO.items():
        marks = [pytest.mark.slow] if arch.slow or name not in DEFAULT_SUITE else []
        for check in CHECKS:
            reason = arch.xfail.get(check)
            xfail = [pytest.mark.xfail(strict=True, reason=f"{reason}; fix: {arch.hints[check]}")] if reason else []
            cases.append(pytest.param(name, check, False, id=f"{name}-{check}", marks=marks + xfail))
            if check in arch.hints:
                cases.append(pytest.param(name, check, True, id=f"{name}-{check}-hinted", marks=marks))
    return cases


@functools.lru_cache(maxsize=len(DEFAULT_SUITE))
def _model(name: str) -> tuple[nn.Module, torch.Tensor]:
    """The architecture with random weights (eval mode) and a batch of two images; never mutated.
    The default suite's models stay built for the train/eval test."""
    arch = ZOO[name]
    torch.manual_seed(0)
    net = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **arch.kwargs).eval()
    return net, torch.randn(2, 3, arch.size, arch.size, generator=torch.Generator().manual_seed(1))


def _fresh(name: str) -> nn.Module:
    return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **ZOO[name].kwargs)


def _method(name: str, method: str, hinted: bool) -> tuple[bf.BranchedModel, bf.OnlineKD]:
    net, _ = _model(name)
    overrides = ZOO[name].hints.get(method, {}) if hinted else {}
    before = snapshot(net)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bm, okd = bf.method(method, net, **overrides)
    assert_unchanged(net, before)
    rebuild = [str(w.message) for w in caught if "cannot rebuild" in str(w.message)]
    assert not rebuild, rebuild
    assert bm.init_used.startswith("donor"), bm.init_used  # timm's own init for every replica
    return bm, okd


def _check_export(name: str, bm: bf.BranchedModel, x: torch.Tensor) -> None:
    bm.eval()
    with torch.no_grad():
        logits = bm(x).logits
        # A re-initialised replica's leaf always; the original lineage's leaf 0 once per architecture.
        for leaf in ([0] if len(bm.spec.splits) > 1 else []) + [bm.num_leaves - 1]:
            exported = bm.export(leaf)
            assert type(exported) is type(_model(name)[0])
            fresh = _fresh(name)
            fresh.load_state_dict(exported.state_dict(), strict=True)
            torch.testing.assert_close(fresh.eval()(x), logits[leaf], atol=ATOL, rtol=0)


def _run(name: str, method: str, hinted: bool) -> None:
    net, x = _model(name)
    bm, okd = _method(name, method, hinted)
    check_branched(net, x, bm, okd, method, NUM_CLASSES, ATOL)
    _check_export(name, bm, x)


def _check_default_split(name: str, hinted: bool) -> None:
    """The default split cuts before a module that runs (a ModuleList never does), between blocks
    that hold parameters (real work); listing split points (for the models caching tensors in
    eval mode) and choosing the split leave nothing in the model."""
    net, _ = _model(name)
    before = snapshot(net)
    if hinted or ZOO[name].caches:
        points = bf.split_points(net)
        assert_unchanged(net, before)
    if hinted:
        assert ZOO[name].hints["split"]["split"] in points
        return
    chosen = default_splits(net, levels=1)
    assert_unchanged(net, before)
    runs = set(bf.split_points(net))
    containers = [s for s in chosen.splits if s not in runs]
    assert not containers, f"splits {containers} are containers that never run: {chosen.reason}"
    empty = [b for b in chosen.blocks if not any(True for _ in net.get_submodule(b).parameters())]
    assert not empty, f"parameter-free blocks {empty}: {chosen.reason}"


@pytest.mark.parametrize("name,check,hinted", _cases())
def test_timm_architecture(name, check, hinted):
    """``split``: the default split is sound; ``one``: ONE (3 leaves) at the default split 2/3
    through the body; ``tsa``: TSA-2-3 (4 leaves) cut 1/3 and 2/3 through the body."""
    if check == "split":
        _check_default_split(name, hinted)
    else:
        _run(name, check, hinted)


# ------------------------------------------------------------------ train / eval follows the module

@pytest.mark.parametrize("name", [pytest.param(n, id=n, marks=[pytest.mark.slow] if a.slow or n not in DEFAULT_SUITE
                                               else []) for n, a in ZOO.items()])
def test_train_eval_follows_the_module(name):
    """At timm's defaults (no dropout, no drop path for most) training passes are as deterministic
    as the original's, and eval passes are identical (also for the models caching in eval mode)."""
    net, x = _model(name)
    bm, _ = _method(name, "one", hinted="one" in ZOO[name].xfail)
    check_train_eval(net, bm, x)


DROPPING = {"resnet18": {}, "convnext_atto": {}, "efficientnet_b0": {}, "vit_tiny_patch16_224": SMALL,
            "swin_tiny_patch4_window7_224": SMALL}


@pytest.mark.parametrize("name", [pytest.param(n, id=n, marks=[] if n in ("convnext_atto", "efficientnet_b0")
                                               else [pytest.mark.slow]) for n in sorted(DROPPING)])
def test_dropout_and_drop_path_follow_the_module(name):
    """With ``drop_rate`` and ``drop_path_rate`` (timm's DropPath calls ``drop_path(x, p,
    self.training)``; the heads ``F.dropout``) training passes differ, as the original's do, and
    eval passes are identical."""
    torch.manual_seed(0)
    net = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, drop_rate=0.2, drop_path_rate=0.2,
                            **DROPPING[name]).eval()
    size = DROPPING[name].get("img_size", 64)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    bm, _ = bf.method("one", net, **ZOO[name].hints.get("one", {}))
    assert check_train_eval(net, bm, x)


def test_the_zoo_is_a_spread():
    families = {a.family for a in ZOO.values()}
    assert families == {"cnn", "vit", "hybrid", "mlp"}
    assert len([a for a in ZOO.values() if not a.slow]) >= 25  # the spread, on small inputs
    assert DEFAULT_SUITE <= ZOO.keys() and {ZOO[n].family for n in DEFAULT_SUITE} == families
    assert all(a.hints.keys() >= a.xfail.keys() for a in ZOO.values())  # every failure names its fix


# ------------------------------------------------------------------ the plugin itself

def test_importing_the_plugin_imports_no_timm():
    code = ("import sys, branchify.integrations.timm as t, branchify.registry as r; r.plugins(); "
            "print('timm' in sys.modules, t.PLUGIN.name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "timm"]


def test_timm_models_are_matched_by_the_entry_point_plugin():
    points = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert points["timm"] == "branchify.integrations.timm:PLUGIN"
    net = timm.create_model("resnet18", pretrained=False, num_classes=3)
    assert plugin_for(net).name == "timm"
    assert plugin_for(nn.Sequential(nn.Linear(2, 2))) is None

    class MyResNet(type(net)):  # a user's subclass: timm's tracer hints, but not timm.create_model
        pass

    mine = MyResNet(block=type(net.layer1[0]), layers=[1, 1, 1, 1], num_classes=3)
    assert plugin_for(mine).name == "timm"
    assert timm_model_fn(mine) is None


def test_the_tracer_carries_timms_leaf_modules_and_autowrap_functions():
    from timm.layers import BatchNormAct2d, ScaledStdConv2d
    from timm.models.swin_transformer import window_reverse

    tracer = timm_tracer(timm.create_model("efficientnet_b0", pretrained=False))
    assert issubclass(BatchNormAct2d, tracer.leaf_types) and issubclass(ScaledStdConv2d, tracer.leaf_types)
    net = timm.create_model("efficientnet_b0", pretrained=False, num_classes=3)
    gm = bf.trace(net, timm_tracer(net))
    called = {type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"}
    assert BatchNormAct2d in called  # recorded as one call, not traced through
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=3, img_size=64)
    functions = {n.target for n in bf.trace(swin, timm_tracer(swin)).graph.nodes if n.op == "call_function"}
    assert window_reverse in functions
    mobilevit = timm.create_model("mobilevit_xxs", pretrained=False, num_classes=3)
    with pytest.raises(bf.TraceError, match=r"'stages.2.1' \(MobileVitBlock\).*control flow"):
        bf.trace(mobilevit, bf.Tracer())  # plain fx cannot: timm's hints are what make it work
    bf.trace(mobilevit, timm_tracer(mobilevit))


def test_optional_inputs_are_traced_at_their_defaults():
    class Net(nn.Module):
        def forward(self, x, mask=None, is_causal=False, scale=torch.ones(1), *rest, **extra):
            return x

    assert optional_inputs(Net()) == {"mask": None, "is_causal": False}
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32)
    gm = bf.trace(vit, timm_tracer(vit))  # plain fx fails on ``if attn_mask is not None or is_causal``
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(gm.eval()(x), vit.eval()(x), atol=ATOL, rtol=0)


def test_model_fn_rebuilds_the_architecture_with_the_models_sizes():
    torch.manual_seed(0)
    net = timm.create_model("resnet18.a1_in1k", pretrained=False, num_classes=7, in_chans=1)
    assert creation_kwargs(net) == [{"num_classes": 7, "in_chans": 1}]
    make = timm_model_fn(net)
    assert (make.timm_name, make.timm_kwargs) == ("resnet18", {"num_classes": 7, "in_chans": 1})
    first, second = make(), make()
    assert type(first) is type(net)
    assert {k: v.shape for k, v in first.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}
    assert not torch.equal(first.conv1.weight, second.conv1.weight)  # fresh init every call
    assert not torch.equal(first.conv1.weight, net.conv1.weight)


def test_model_fn_finds_the_image_size_a_levit_does_not_keep():
    net = timm.create_model("levit_128s", pretrained=False, num_classes=10, img_size=64)
    make = timm_model_fn(net)
    size = make.timm_kwargs["img_size"]
    assert size // 16 == 64 // 16  # the same token grid: the same attention-bias shapes
    assert {k: v.shape for k, v in make().state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}


def test_model_fn_falls_back_to_shuffle_with_an_explanation():
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, depth=3)
    with pytest.warns(UserWarning, match=r"cannot rebuild this timm VisionTransformer .*shuffle.*different "
                                         r"architecture: 108 state_dict entries the model lacks \(blocks\.10\..*"
                                         r"pass model_fn=lambda: timm.create_model"):
        bm = bf.branchify(net, bf.Spec(splits=["blocks.2"], fanout=[2]))
    assert bm.init_used.startswith("shuffle")
    own = bf.branchify(net, bf.Spec(splits=["blocks.2"], fanout=[2]),
                       model_fn=lambda: timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, depth=3))
    assert own.init_used.startswith("donor")

    nameless = timm.create_model("resnet18", pretrained=False, num_classes=10)
    nameless.pretrained_cfg = nameless.default_cfg = {}  # timm keeps both (default_cfg for old code)
    with pytest.warns(UserWarning, match=r"no pretrained_cfg\['architecture'\].*pass model_fn="):
        assert timm_model_fn(nameless) is None


def test_tracing_a_caching_model_directly_leaves_state_behind():
    """What the zoo's ``assert_unchanged`` guards against: tracing LeViT itself in eval mode stores
    fx proxies in its attention-bias caches (branchify traces deep copies)."""
    net = timm.create_model("levit_128s", pretrained=False, num_classes=10, img_size=64).eval()
    before = snapshot(net)
    timm_tracer(net).trace(net)
    with pytest.raises(AssertionError, match="left state behind"):
        assert_unchanged(net, before)
