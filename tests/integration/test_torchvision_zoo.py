"""Every torchvision classifier through branchify with no user hints.

The spread is ``torchvision.models.list_models(module=torchvision.models)`` (the classification
models), each built with random weights, ``num_classes=10``, on small inputs where the architecture
allows. Each is checked with the default split of a one-level tree (ONE) and of a two-level tree
(TSA, cut 1/3 and 2/3 through the body; see :mod:`branchify.surgery.default_split`). The one-level
default split *is* "a split 2/3 through": it cuts before body block ``ceil(2n/3)``.

For every check: leaf 0 equals the model at init (eval mode, atol 1e-5), the user's model is left
exactly as it was, one SGD step moves every segment, and an exported leaf is the original class,
loads strictly into a fresh instance built by the same torchvision constructor and reproduces the
branched leaf (atol 1e-5). A separate test checks that training mode follows the module: two
eval-mode passes are identical, and two training-mode passes differ exactly when they differ for
the original (dropout, stochastic depth).

A known failure is an ``xfail(strict=True)`` whose reason names the hint that fixes it, and the
hinted variant is run too (it must pass). Replicas are re-initialised with the architecture's own
constructor (``model_fn``). Ten architectures run in the default suite (:data:`DEFAULT_SUITE`);
the rest of the spread is marked slow (``pytest -m slow tests/integration/test_torchvision_zoo.py``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn
from torchvision import models as tvm

import branchify as bf
from zoo_checks import assert_unchanged, check_branched, check_train_eval, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")  # small inputs: see conftest.one_thread
ATOL = 1e-5
NUM_CLASSES = 10


@dataclass(frozen=True)
class Arch:
    """One entry: ``torchvision.models.get_model(name, num_classes=10, **kwargs)`` on ``size``x``size``.

    ``xfail``: check (``"one"``, ``"tsa"``) -> why it fails with the defaults; ``hints``: check ->
    the ``bf.method`` overrides that fix it. ``slow``: too large or slow for the default suite.
    """

    name: str
    family: str
    size: int = 64  # at 32 a CNN's last BatchNorms see 2 values a channel and one step can blow up
    kwargs: dict[str, Any] = field(default_factory=dict)
    xfail: dict[str, str] = field(default_factory=dict)
    hints: dict[str, dict[str, Any]] = field(default_factory=dict)
    slow: bool = False


def _vit(name: str, size: int = 32, slow: bool = False) -> Arch:
    return Arch(name, "vit", size=size, kwargs={"image_size": size}, slow=slow)


ZOO: dict[str, Arch] = {a.name: a for a in [
    Arch("alexnet", "alexnet"),
    *[Arch(f"convnext_{s}", "convnext", slow=s in ("base", "large")) for s in ("tiny", "small", "base", "large")],
    *[Arch(f"densenet{d}", "densenet") for d in (121, 161, 169, 201)],
    *[Arch(f"efficientnet_b{i}", "efficientnet") for i in range(8)],
    *[Arch(f"efficientnet_v2_{s}", "efficientnet_v2", slow=s == "l") for s in ("s", "m", "l")],
    Arch("googlenet", "googlenet"),
    Arch("inception_v3", "inception", size=128),  # >= 75 in eval; the training-mode aux head needs more
    Arch("maxvit_t", "maxvit", size=224),  # its window partitions need 224
    *[Arch(f"mnasnet{w}", "mnasnet") for w in ("0_5", "0_75", "1_0", "1_3")],
    Arch("mobilenet_v2", "mobilenet_v2"),
    *[Arch(f"mobilenet_v3_{s}", "mobilenet_v3") for s in ("large", "small")],
    *[Arch(f"regnet_x_{f}", "regnet", slow=f in ("16gf", "32gf"))
      for f in ("400mf", "800mf", "1_6gf", "3_2gf", "8gf", "16gf", "32gf")],
    *[Arch(f"regnet_y_{f}", "regnet", slow=f in ("16gf", "32gf", "128gf"))
      for f in ("400mf", "800mf", "1_6gf", "3_2gf", "8gf", "16gf", "32gf", "128gf")],
    *[Arch(f"resnet{d}", "resnet", slow=d == 152) for d in (18, 34, 50, 101, 152)],
    *[Arch(n, "resnext", slow=n == "resnext101_64x4d") for n in ("resnext50_32x4d", "resnext101_32x8d",
                                                                 "resnext101_64x4d")],
    *[Arch(f"shufflenet_v2_x{w}", "shufflenet") for w in ("0_5", "1_0", "1_5", "2_0")],
    *[Arch(f"squeezenet1_{v}", "squeezenet") for v in (0, 1)],
    *[Arch(f"swin_{s}", "swin", size=32, slow=s == "b") for s in ("t", "s", "b")],  # LayerNorm: 32 will do
    *[Arch(f"swin_v2_{s}", "swin_v2", size=32, slow=s == "b") for s in ("t", "s", "b")],
    *[Arch(f"vgg{d}{bn}", "vgg", slow=(d, bn) != (11, "")) for d in (11, 13, 16, 19) for bn in ("", "_bn")],
    _vit("vit_b_16"), _vit("vit_b_32"), _vit("vit_l_16", slow=True), _vit("vit_l_32", slow=True),
    _vit("vit_h_14", size=28, slow=True),
    *[Arch(f"wide_resnet{d}_2", "wide_resnet", slow=d == 101) for d in (50, 101)],
]}

CHECKS = ("one", "tsa")

DEFAULT_SUITE = {"densenet121", "efficientnet_b0", "googlenet", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small",
                 "regnet_x_400mf", "resnet18", "shufflenet_v2_x0_5", "squeezenet1_1"}
"""The default suite: one cheap architecture of ten families, among them what each needed a fix -
functional dropout (DenseNet), stochastic depth (EfficientNet), aux heads that the traced forward
never runs (GoogLeNet), state-dict metadata (MNASNet).
The rest of the spread - every other torchvision classifier - runs under ``-m slow``
(``pytest -m slow tests/integration/test_torchvision_zoo.py``, about an hour on two cores; the
600M-parameter ``vit_h_14`` and ``regnet_y_128gf`` need more than 20 GB of memory)."""


def _slow(name: str) -> list:
    return [pytest.mark.slow] if ZOO[name].slow or name not in DEFAULT_SUITE else []


def _cases() -> list:
    """(architecture, check, hinted) cases, grouped by architecture (its model is built once):
    every check unhinted, plus the hinted variant of each check that has a hint."""
    cases = []
    for name, arch in ZOO.items():
        for check in CHECKS:
            reason = arch.xfail.get(check)
            xfail = [pytest.mark.xfail(strict=True, reason=f"{reason}; fix: {arch.hints[check]}")] if reason else []
            cases.append(pytest.param(name, check, False, id=f"{name}-{check}", marks=_slow(name) + xfail))
            if check in arch.hints:
                cases.append(pytest.param(name, check, True, id=f"{name}-{check}-hinted", marks=_slow(name)))
    return cases


def _fresh(name: str) -> nn.Module:
    return tvm.get_model(name, weights=None, num_classes=NUM_CLASSES, **ZOO[name].kwargs)


_BUILT: dict[str, tuple[nn.Module, torch.Tensor]] = {}
_CACHED_PARAMETERS = 150_000_000  # the default suite's models stay built for the train/eval test


def _model(name: str) -> tuple[nn.Module, torch.Tensor]:
    """The architecture with random weights (eval mode) and a batch of two images; never mutated.
    Built once: the most recent models are kept up to a total of ``_CACHED_PARAMETERS``."""
    if name not in _BUILT:
        torch.manual_seed(0)
        net = _fresh(name).eval()
        size = ZOO[name].size
        _BUILT[name] = net, torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
        while len(_BUILT) > 1 and sum(p.numel() for m, _ in _BUILT.values() for p in m.parameters()) > _CACHED_PARAMETERS:
            del _BUILT[next(iter(_BUILT))]  # the oldest
    return _BUILT[name]


def _method(name: str, method: str, hinted: bool) -> tuple[bf.BranchedModel, bf.OnlineKD]:
    net, _ = _model(name)
    overrides = ZOO[name].hints.get(method, {}) if hinted else {}
    before = snapshot(net)
    # The architecture's own init for the re-initialised replicas (what the README recommends, and
    # ~6x cheaper than permuting every parameter with init="shuffle"; test_init covers shuffle).
    bm, okd = bf.method(method, net, model_fn=functools.partial(_fresh, name), **overrides)
    assert_unchanged(net, before)
    return bm, okd


def _check_export(name: str, bm: bf.BranchedModel, x: torch.Tensor) -> None:
    bm.eval()
    fresh = _fresh(name).eval()  # a strict load replaces every state_dict entry: one instance will do
    with torch.no_grad():
        logits = bm(x).logits
        # A re-initialised replica's leaf always; the original lineage's leaf 0 once per architecture.
        for leaf in ([0] if len(bm.spec.splits) > 1 else []) + [bm.num_leaves - 1]:
            exported = bm.export(leaf)
            assert type(exported) is type(_model(name)[0])
            fresh.load_state_dict(exported.state_dict(), strict=True)
            torch.testing.assert_close(fresh(x), logits[leaf], atol=ATOL, rtol=0)


def _run(name: str, method: str, hinted: bool) -> None:
    net, x = _model(name)
    bm, okd = _method(name, method, hinted)
    check_branched(net, x, bm, okd, method, NUM_CLASSES, ATOL)
    _check_export(name, bm, x)


@pytest.mark.parametrize("name,check,hinted", _cases())
def test_torchvision_architecture(name, check, hinted):
    """``one``: ONE (3 leaves) at the default split, 2/3 through the body; ``tsa``: TSA-2-3
    (4 leaves) cut 1/3 and 2/3 through the body."""
    _run(name, check, hinted)


# ------------------------------------------------------------------ train / eval follows the module

DETERMINISTIC = {"resnet", "resnext", "wide_resnet", "regnet", "shufflenet", "densenet", "vit"}
"""Families without dropout or stochastic depth in training at torchvision's defaults (DenseNet's
``drop_rate`` and ViT's ``dropout`` are 0); every other family has one or both."""


def _train_eval_cases() -> list:
    return [pytest.param(name, id=name, marks=_slow(name)) for name in ZOO]


@pytest.mark.parametrize("name", _train_eval_cases())
def test_train_eval_follows_the_module(name):
    """Dropout (nn.Dropout, F.dropout(training=self.training) in DenseNet) and stochastic depth
    (torchvision.ops.stochastic_depth in EfficientNet, ConvNeXt, Swin, MaxViT) follow
    ``.train()`` / ``.eval()`` of the branched model."""
    net, x = _model(name)
    hinted = "one" in ZOO[name].xfail
    bm, _ = _method(name, "one", hinted)
    assert check_train_eval(net, bm, x) == (ZOO[name].family not in DETERMINISTIC)


def test_functional_dropout_follows_the_module():
    """DenseNet's ``F.dropout(x, p=drop_rate, training=self.training)`` is traced as a call whose
    ``training`` reads the segment's flag (the spread's DenseNets have ``drop_rate=0``)."""
    torch.manual_seed(0)
    net = tvm.DenseNet(growth_rate=8, block_config=(2, 2, 2), num_init_features=16, drop_rate=0.3,
                       num_classes=NUM_CLASSES).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    bm, _ = bf.method("one", net)
    assert check_train_eval(net, bm, x)


def test_the_spread_is_every_torchvision_classifier():
    assert set(ZOO) == set(tvm.list_models(module=tvm))
    assert DEFAULT_SUITE <= ZOO.keys()
    assert all(a.hints.keys() >= a.xfail.keys() for a in ZOO.values())  # every failure names its fix
    unhinted = [(n, c) for n, a in ZOO.items() for c in CHECKS]
    assert sum((n, c) not in {(n, c) for n, a in ZOO.items() for c in a.xfail} for n, c in unhinted) \
        >= 0.97 * len(unhinted)  # the acceptance: >= 97% pass without hints
