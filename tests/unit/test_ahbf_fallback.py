"""AHBF's fallbacks when no residual block after the cut can start as the identity
(:mod:`branchify.surgery.deepen_pick`): the cut moves back to a residual block (RegNet), fresh
copies of the shape-preserving unit after the cut (a VGG-like stack's conv + BN + ReLU,
GoogLeNet's ``inception5a`` wrapped in an ``nn.Sequential``), the cut moved back to such a unit
(ShuffleNet), a dense block after a fresh transition (DenseNet); each says so in ``describe()``
and with one warning, and the deepened leaves train a step and export exactly. The CIFAR ResNet
of the accuracy benchmark keeps its block.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import branchify as bf
import branchify.methods.ahbf as ahbf_preset
from branchify.methods import MethodError

pytestmark = pytest.mark.usefixtures("one_thread")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # hf_tiny_models


@pytest.fixture(autouse=True)
def _fresh_warnings():
    """Each test sees the one-time fallback warnings afresh."""
    ahbf_preset._WARNED.clear()
    yield
    ahbf_preset._WARNED.clear()


class Plain(nn.Module):
    """A VGG-like stack: conv + BN + ReLU units in one ``features`` Sequential, a Linear head."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()

        def unit(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(*unit(3, 8), nn.MaxPool2d(2), *unit(8, 16), nn.MaxPool2d(2),
                                      *unit(16, 16), *unit(16, 16), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(16 * 4, 32), nn.ReLU(inplace=True), nn.Linear(32, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 2), 1))


class Downsampling(nn.Module):
    """Every block halves the map and changes its width: no block to copy anywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.ReLU())
                                      for c in (3, 6, 12, 24)])
        self.fc = nn.Linear(48, 5)

    def forward(self, x):
        return self.fc(self.blocks(x).mean((2, 3)))


def _method(net: nn.Module, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bm, okd = bf.method("ahbf", net, **kw)
    fallbacks = [w for w in caught if issubclass(w.category, UserWarning) and "AHBF on" in str(w.message)]
    return bm, okd, fallbacks


def _trains_and_exports(bm, okd, x, y, deepest: int = 3):
    """One SGD step gives a finite loss; export() is leaf 0 exactly; export(deepest) is that leaf."""
    okd.set_epoch(1, 2)
    loss = okd(bm.train()(x), y)
    assert torch.isfinite(loss.total), loss.parts
    loss.total.backward()
    torch.optim.SGD(bm.parameters(), lr=0.01).step()
    bm.eval()
    with torch.no_grad():
        out = bm(x)
        torch.testing.assert_close(bm.export().eval()(x), out.logits[0], rtol=0, atol=0)
        deep = bm.export(deepest).eval()
        torch.testing.assert_close(deep(x), out.logits[deepest], rtol=1e-5, atol=1e-6)
    sizes = [sum(p.numel() for p in bm.segments[f"b{i}"].parameters()) for i in range(deepest + 1)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    return deep


def test_a_plain_stack_deepens_with_fresh_copies_of_its_last_conv_unit():
    torch.manual_seed(0)
    bm, okd, caught = _method(Plain())
    (key, counts), = bm.spec.deepen.items()
    assert key == "features[11:14]" and counts[0] == 0 and counts[1] > 0  # conv 11, its BN and ReLU
    assert bm.spec.deepen_init == "standard"
    d = bm.deepened[key]
    assert (d["block"], d["class"], d["start"]) == (key, "Conv2d + BatchNorm2d + ReLU", "the architecture's own init")
    text = bm.describe(torch.randn(2, 3, 32, 32), print_fn=None)
    assert "fallback: no shape-preserving block after the split" in text and "deepen_init='standard'" in text
    assert "deepen_container=" in text and "aux=0" in text
    (w,) = caught  # one warning naming the choice and how to pick another
    assert "Plain" in str(w.message) and "features[11:14]" in str(w.message) and "deepen_container=" in str(w.message)
    _, _, again = _method(Plain())
    assert again == []  # once per model class and fallback
    # fresh blocks at the architecture's init: the BN scale is 1, not the 0 of an identity start
    first = bm.export(1).features[14]
    assert torch.equal(first[1].weight, torch.ones(16))
    assert not torch.equal(first[0].weight, bm.export(1).features[11].weight)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 3])
    deep = _trains_and_exports(bm, okd, x, y)
    assert type(deep) is Plain
    copies = [m for m in deep.features if isinstance(m, nn.Sequential)]
    assert len(copies) == counts[3] and [type(m).__name__ for m in copies[0]] == ["Conv2d", "BatchNorm2d", "ReLU"]


def test_asking_for_standard_init_is_no_fallback():
    torch.manual_seed(0)
    bm, _, caught = _method(Plain(), deepen_init="standard")
    assert caught == [] and "note" not in bm.deepened["features[11:14]"]


def test_regnet_whose_last_stage_is_one_downsampling_block_moves_the_cut_back():
    from torchvision.models.regnet import BlockParams, RegNet
    torch.manual_seed(0)
    params = BlockParams(depths=[1, 2, 1], widths=[8, 16, 32], group_widths=[8, 8, 8],
                         bottleneck_multipliers=[1.0] * 3, strides=[2, 2, 2])
    net = RegNet(params, num_classes=5, stem_width=8)
    bm, okd, caught = _method(net)
    assert bm.spec.splits == ["trunk_output.block2.block2-1"]
    assert list(bm.spec.deepen) == ["trunk_output.block2"] and bm.spec.deepen_init == "identity"
    assert "AHBF moved it to trunk_output.block2.block2-1" in bm.split_reason
    assert len(caught) == 1 and "pass split=" in str(caught[0].message)
    twins, _, _ = _method(net, init="copy")  # identity copies: every leaf computes the original at init
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        same = twins.eval()(x).logits
    for z in same[1:]:
        torch.testing.assert_close(z, same[0], rtol=1e-4, atol=1e-5)
    _trains_and_exports(bm, okd, x, torch.tensor([0, 4]))


def test_shufflenet_moves_the_cut_to_its_last_stride_1_block():
    torch.manual_seed(0)
    bm, okd, caught = _method(torchvision.models.shufflenet_v2_x0_5(num_classes=5), branches=2)
    assert bm.spec.splits == ["stage4.3"] and list(bm.spec.deepen) == ["stage4"]
    assert bm.deepened["stage4"]["block"] == "stage4.3" and bm.spec.deepen_init == "standard"
    assert "the branches start at stage4.3" in bm.deepened["stage4"]["note"] and len(caught) == 1
    deep = _trains_and_exports(bm, okd, torch.randn(2, 3, 64, 64), torch.tensor([0, 4]), deepest=1)
    assert len(deep.stage4) == 4 + bm.spec.deepen["stage4"][1]


def test_googlenet_wraps_its_last_shape_preserving_inception_module():
    torch.manual_seed(0)
    net = torchvision.models.googlenet(num_classes=5, aux_logits=False, init_weights=True)
    bm, okd, _ = _method(net, branches=2, aux=1)
    assert bm.spec.deepen == {"inception5a": [0, 1]} and bm.deepened["inception5a"]["class"] == "Inception"
    deep = _trains_and_exports(bm, okd, torch.randn(2, 3, 64, 64), torch.tensor([0, 4]), deepest=1)
    assert type(deep) is type(net) and isinstance(deep.inception5a, nn.Sequential)
    assert [type(m).__name__ for m in deep.inception5a] == ["Inception", "Inception"]


def test_densenet_deepens_its_last_dense_block_after_a_fresh_transition():
    torch.manual_seed(0)
    net = torchvision.models.DenseNet(growth_rate=4, block_config=(1, 1, 1, 2), num_init_features=8, num_classes=5)
    bm, okd, caught = _method(net, branches=3, aux=1)
    assert bm.spec.deepen == {"features.denseblock4@transition": [0, 1, 2]}
    assert "transition back to its input width" in bm.deepened["features.denseblock4@transition"]["note"]
    assert len(caught) == 1
    deep = _trains_and_exports(bm, okd, torch.randn(2, 3, 64, 64), torch.tensor([0, 4]), deepest=2)
    assert type(deep) is type(net)
    grown = [m for name, m in deep.features.named_children() if name.isdigit()]
    assert len(grown) == 2 and list(grown[0]._modules) == ["transition", "block"]
    c_in = net.features.denseblock4.denselayer1.norm1.num_features
    assert grown[0].transition.conv.weight.shape == (c_in, net.features.norm5.num_features, 1, 1)


def test_a_model_with_nothing_to_copy_names_what_works():
    torch.manual_seed(0)
    with pytest.raises(MethodError, match="keeps the shape of its input") as err:
        _method(Downsampling())
    assert "aux=0" in str(err.value) and "bf.method('one', model)" in str(err.value)
    bm, okd, _ = _method(Downsampling(), aux=0)  # and what it names works
    assert bm.spec.deepen == {}
    okd.set_epoch(1, 2)
    assert torch.isfinite(okd(bm.train()(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1])).total)


@pytest.mark.parametrize("overrides, counts", [({}, [0, 4, 8, 12]), ({"aux": 1}, [0, 1, 2, 3])])
def test_the_benchmark_cifar_resnet_keeps_its_deepened_block(overrides, counts):
    """The accuracy benchmark's AHBF row (CifarResNet(14) on 1-channel images, aux=1) was measured
    with copies of layer3's last block starting at a zero last-BN scale: no fallback touches it."""
    from branchify.recipes.zoo import CifarResNet
    torch.manual_seed(0)
    bm, _, caught = _method(CifarResNet(14, num_classes=10, in_channels=1), **overrides)
    assert caught == []
    assert bm.spec.splits == ["layer3"] and bm.spec.deepen == {"layer3": counts}
    assert bm.spec.deepen_init == "identity"
    assert bm.deepened == {"layer3": {"block": "layer3.1", "class": "BasicBlock",
                                      "start": "the identity (the scale of its last normalisation layer 'bn2' at 0)"}}
    text = bm.describe(torch.randn(2, 1, 14, 14), print_fn=None)
    assert (f"deepened: copies of layer3.1 (BasicBlock) go right after it (deepen key 'layer3': {counts} per leaf); "
            f"they start as the identity (the scale of its last normalisation layer 'bn2' at 0)") in text
    assert "fallback" not in text


def test_swin_v2_blocks_start_as_the_identity():
    """Swin V2 registers its position-bias MLP after the attention's output projection: the
    projection that closes the branch is the one zeroed, so its blocks need no fallback."""
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2
    torch.manual_seed(0)
    net = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1, 2, 2], num_heads=[1, 2, 2, 4],
                          window_size=[2, 2], num_classes=5, block=SwinTransformerBlockV2,
                          downsample_layer=PatchMergingV2)
    twins, _, caught = _method(net, init="copy")
    assert caught == [] and twins.deepened["features.7"]["block"] == "features.7.1"
    assert "attn.proj.weight/bias" in twins.deepened["features.7"]["start"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        same = twins.eval()(x).logits
    for z in same[1:]:
        torch.testing.assert_close(z, same[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family, layers", [("wav2vec2", "wav2vec2.encoder.layers"),
                                             ("whisper", "model.encoder.layers")])
def test_audio_models_are_probed_with_the_input_they_take(family, layers):
    """Raw audio is ``(batch, samples)`` (the model adds the channel), Whisper's mel frames are as
    many as its config declares, and LayerDrop skips no layer while the blocks are recorded."""
    pytest.importorskip("transformers")
    from hf_tiny_models import make_zoo_model

    from branchify.surgery.block_calls import record_calls
    net = make_zoo_model(family)
    encoder = net.get_submodule(layers.rpartition(".")[0])
    net.config.layerdrop = encoder.layerdrop = 0.9  # training mode would skip nine layers in ten
    calls = record_calls(net)
    assert all(calls[f"{layers}.{i}"].count == 1 for i in range(3))
    assert net.config.layerdrop == encoder.layerdrop == 0.9  # only the recorded copy ran without it
    bm, _, _ = _method(net)
    assert bm.deepened and all(k.startswith(("wav2vec2.encoder", "model.")) for k in bm.spec.deepen)


class Wrapped(nn.Module):
    """A residual block held as a plain attribute (its parent is no container)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = _Residual(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


class _Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) + x)


def test_spec_keys_name_runs_wrapped_blocks_and_transitions():
    """The key forms the fallbacks use, given by hand to ``bf.branchify``."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    spec = bf.Spec(splits=["features.8"], fanout=[2], deepen={"features[8:11]": [0, 2]}, deepen_init="standard")
    bm = bf.branchify(Plain(), spec).eval()
    deep = bm.export(1).eval()
    assert [type(m).__name__ for m in deep.features[11:14]] == ["Sequential", "Sequential", "Conv2d"]
    with torch.no_grad():
        torch.testing.assert_close(deep(x), bm(x).logits[1], rtol=1e-5, atol=1e-6)
    spec = bf.Spec(splits=["block"], fanout=[2], deepen={"block": [0, 3]}, deepen_init="standard")
    bm = bf.branchify(Wrapped(), spec).eval()
    deep = bm.export(1).eval()
    assert isinstance(deep.block, nn.Sequential) and len(deep.block) == 4 and type(deep.block[0]) is _Residual
    assert torch.equal(deep.block[0].conv.weight, bm.segments["b1"].get_submodule("block.0.conv").weight)
    with torch.no_grad():
        torch.testing.assert_close(deep(x), bm(x).logits[1], rtol=1e-5, atol=1e-6)
    with pytest.raises(bf.SpecError, match="drop '@transition'"):
        bf.branchify(Plain(), bf.Spec(splits=["features.8"], fanout=[2], deepen={"classifier@transition": [0, 1]}))
    with pytest.raises(bf.SpecError, match=r"'features\[8:99\]': 'features' has 15 children"):
        bf.branchify(Plain(), bf.Spec(splits=["features.8"], fanout=[2], deepen={"features[8:99]": [0, 1]}))
