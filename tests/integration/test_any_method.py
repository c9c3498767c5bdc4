"""Any method on any model: every preset of ``bf.available_methods()``, at its defaults, on a spread
of torchvision, timm and Hugging Face architectures - no split, no hints.

For each (method, architecture): ``bf.method(method, model)`` builds, one clipped SGD step gives a
finite loss, and ``export()`` is the original class whose outputs equal the deployed leaf's
(eval mode). The parametrisation reads ``bf.available_methods()``, so a preset added later is
covered without touching this file. A small subset runs in the default suite; the full spread -
every torchvision classifier and the timm and HF spreads of ``test_torchvision_zoo.py``,
``test_timm_zoo.py`` and ``hf_tiny_models.py`` - runs with ``pytest -m slow
tests/integration/test_any_method.py``.

A pair that cannot work at the defaults is listed in :data:`KNOWN` with the message its error
must carry (the working alternative); the test then checks that exact failure, and runs the
alternative (:data:`ALTERNATIVES`) through the same checks.
"""
from __future__ import annotations

import functools
import importlib.util
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import branchify as bf

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_CLASSES = 10
ATOL = 1e-4
HERE = Path(__file__).parent


@functools.lru_cache(maxsize=None)
def _load(name: str):
    """A sibling test module's architecture table (loaded by path, under a private name)."""
    spec = importlib.util.spec_from_file_location(f"_spread_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


DEFAULT_SUITE = [("torchvision", "mobilenet_v3_small"), ("torchvision", "squeezenet1_1"),
                 ("timm", "vit_tiny_patch16_224"), ("hf", "llama")]
"""A CNN with inverted residuals, a CNN without a final Linear, a ViT and a decoder LM: the cheap
subset in the default suite (one of each kind of body and head)."""

ISSUE_SPREAD = [("torchvision", n) for n in ("resnet18", "mobilenet_v3_small", "convnext_tiny", "shufflenet_v2_x0_5",
                                              "vgg11_bn", "swin_t", "densenet121", "squeezenet1_1", "vit_b_32",
                                              "mnasnet0_5", "efficientnet_b0", "regnet_x_400mf")] + \
               [("timm", n) for n in ("convnextv2_atto", "efficientvit_b0", "vit_tiny_patch16_224", "resnet18")] + \
               [("hf", n) for n in ("llama", "bert", "vit")]
"""The 19 architectures a new user tried every preset on."""

KNOWN: dict[tuple[str, str], str] = {
    # ONE's gate reads the cut, which timm Swin's patch merging regroups into 4C channels first
    ("one", "swin_tiny_patch4_window7_224"): r"reads it through a reshape .* \(split='layers\.3\.blocks\.0'\)",
    # AHBF deepens with copies of a block after the cut (or of its last block, a VGG's conv + BN +
    # ReLU, a dense block after a transition...; see branchify.surgery.deepen_pick). ALBERT runs one
    # shared layer three times and the default split cuts at its classifier; timm's test_nfnet is
    # one downsampling block per stage: nothing to copy in either
    ("ahbf", "albert"): r"AHBF found no block .*is shared.*Pass aux=0 .*bf\.method\('one', model\)",
    ("ahbf", "test_nfnet"): r"AHBF found no block .*Pass aux=0 .*bf\.method\('one', model\)",
}
"""(method, architecture) -> a regular expression the build error must match (it names the working
alternative). Empty when every pair works."""

ALTERNATIVES: dict[tuple[str, str], dict[str, Any]] = {
    ("one", "swin_tiny_patch4_window7_224"): {"split": "layers.3.blocks.0"},
    ("ahbf", "albert"): {"aux": 0},
    ("ahbf", "test_nfnet"): {"aux": 0},
}
"""The alternative each :data:`KNOWN` error names, as ``bf.method`` overrides: the test runs it in the
pair's place (it must build, train a step and export)."""


def _spread() -> list[tuple[str, str]]:
    """Every architecture of the three zoo spreads (the slow part of this test)."""
    import torchvision
    names = [("torchvision", n) for n in torchvision.models.list_models(module=torchvision.models)]
    try:
        names += [("timm", n) for n in _load("test_timm_zoo").ZOO]
    except pytest.skip.Exception:  # timm missing: the timm spread is skipped there too
        pass
    try:
        from hf_tiny_models import ZOO as HF_ZOO
        names += [("hf", n) for n in HF_ZOO]
    except pytest.skip.Exception:
        pass
    return names


def _cases() -> list:
    methods = bf.available_methods()
    cases, seen = [], set()
    for zoo, name in DEFAULT_SUITE + [a for a in ISSUE_SPREAD + _spread() if a not in DEFAULT_SUITE]:
        if (zoo, name) in seen:
            continue
        seen.add((zoo, name))
        marks = [] if (zoo, name) in DEFAULT_SUITE else [pytest.mark.slow]
        cases += [pytest.param(method, zoo, name, id=f"{method}-{zoo}-{name}", marks=marks) for method in methods]
    return cases


TRAINING_SIZE = {"inception_v3": 299}
"""Architectures whose training-mode forward needs a larger input than the zoo's (Inception v3's aux
head reads a 1x1 map at 128 and a 3x3 one at 224 with a 5x5 convolution: the plain model fails too)."""


def _torchvision(name: str) -> tuple[nn.Module, dict, torch.Tensor]:
    from torchvision import models as tvm
    arch = _load("test_torchvision_zoo").ZOO.get(name)
    size, kwargs = (arch.size, arch.kwargs) if arch is not None else (64, {})
    size = TRAINING_SIZE.get(name, size)
    net = tvm.get_model(name, num_classes=NUM_CLASSES, **kwargs)
    return net, {"x": torch.randn(2, 3, size, size)}, torch.arange(2) % NUM_CLASSES


def _timm(name: str) -> tuple[nn.Module, dict, torch.Tensor]:
    timm = pytest.importorskip("timm")
    arch = _load("test_timm_zoo").ZOO.get(name)  # convnextv2_atto (the issue's) is not in the timm zoo
    size, kwargs = (arch.size, arch.kwargs) if arch is not None else (64, {})
    net = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs)
    return net, {"x": torch.randn(2, 3, size, size)}, torch.arange(2) % NUM_CLASSES


def _hf(name: str) -> tuple[nn.Module, dict, torch.Tensor]:
    from hf_tiny_models import make_zoo_batch, make_zoo_model
    batch = make_zoo_batch(name, seed=1)
    return make_zoo_model(name), batch, batch.pop("labels")


def _call(module: nn.Module, inputs: dict) -> Any:
    return module(inputs["x"]) if set(inputs) == {"x"} else module(**inputs)


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def _build(method: str, net: nn.Module, **overrides: Any):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tied weights across a cut, never-run modules
        return bf.method(method, net, **overrides)


def _deployed(model: nn.Module) -> nn.Module:
    """What ``export()`` deploys: the temporal mean's copy when it deploys (PCL), else the model. The
    copy keeps its own BatchNorm statistics (its own training-mode forwards, stochastic depth included)."""
    temporal = getattr(model, "temporal", None)
    return temporal.model if temporal is not None and temporal.deploy else model


@pytest.mark.parametrize("method, zoo, name", _cases())
def test_every_preset_at_its_defaults(method, zoo, name):
    torch.manual_seed(0)
    net, inputs, labels = {"torchvision": _torchvision, "timm": _timm, "hf": _hf}[zoo](name)
    known = KNOWN.get((method, name))
    if known is not None:
        with pytest.raises(bf.BranchifyError, match=known):
            _build(method, net)
    model, okd = _build(method, net, **ALTERNATIVES.get((method, name), {}))

    model.train()
    okd.set_epoch(1, 2)  # past the start of every ramp: the KD terms weigh in
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss = okd(_call(model, inputs), labels)
    assert torch.isfinite(loss.total), loss.parts
    loss.total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # batch-2 BatchNorm: see zoo_checks
    opt.step()

    model.eval()
    with torch.no_grad():
        out = _call(_deployed(model), inputs)
        deployed = out.logits[model.target]
        exported = model.export().eval()
        assert type(exported) is type(net)
        got = _logits(_call(exported, inputs))
    assert torch.isfinite(deployed).all()
    torch.testing.assert_close(got, deployed, atol=ATOL, rtol=0)


def test_every_known_failure_has_its_alternative():
    assert KNOWN.keys() == ALTERNATIVES.keys()


def test_the_spread_covers_every_kind_of_model():
    zoos = {zoo for zoo, _ in DEFAULT_SUITE}
    assert zoos == {"torchvision", "timm", "hf"}
    assert set(DEFAULT_SUITE) <= set(ISSUE_SPREAD)
    assert len(bf.available_methods()) >= 7
