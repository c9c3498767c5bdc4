"""AHBF at its defaults on any stack of blocks: the deepened block is found from a real forward
and its copies start as the identity (models with no residual block to copy: test_ahbf_fallback.py).

For each model: with replicas that copy leaf 0 (``init="copy"``) every leaf's logits equal leaf
0's at init (eval mode; leaf 0 is the original model), so the deepening alone changes nothing; the deeper leaves hold more parameters, one SGD step gives a finite loss, ``export()``
is leaf 0 and ``export(3)`` - the deepest leaf, exported as the original class with the copies
in place - computes leaf 3.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models.convnext import CNBlockConfig
from torchvision.models.swin_transformer import SwinTransformer

import branchify as bf

pytestmark = pytest.mark.usefixtures("one_thread")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _method(net: torch.nn.Module, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # never-run modules, tied weights
        return bf.method("ahbf", net, **kw)


def _image(c: int = 3, size: int = 32):
    x = torch.randn(2, c, size, size, generator=torch.Generator().manual_seed(1))
    return (x,), {}, torch.tensor([1, 3])


def _hf(family: str):
    H = pytest.importorskip("hf_tiny_models")
    batch = H.make_batch(family, batch=2, labels=False)
    return batch, (torch.tensor([1, 2]) if family != "vit" else torch.tensor([1, 3]))


def _llama():
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32)
    return T.LlamaForCausalLM(cfg)


def _swin():
    torch.manual_seed(0)
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1, 2, 2], num_heads=[1, 2, 2, 4],
                           window_size=[2, 2], num_classes=5)


def _convnext():
    torch.manual_seed(0)
    setting = [CNBlockConfig(8, 16, 1), CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 2)]
    return torchvision.models.ConvNeXt(setting, num_classes=5)


def _vit():
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=3, num_heads=2,
                                                hidden_dim=16, mlp_dim=32, num_classes=5)


def _tv(name: str):
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(num_classes=5)


# name -> (model factory, the block deepened, extra blocks per leaf step, inputs)
CASES = {
    "vit": (_vit, "encoder.layers.encoder_layer_2", 4, lambda: _image(3, 16)),
    "swin": (_swin, "features.7.1", 2, lambda: _image(3, 32)),
    "convnext": (_convnext, "features.5.1", 4, lambda: _image(3, 32)),
    "mobilenet_v3_small": (lambda: _tv("mobilenet_v3_small"), "features.11", 2, lambda: _image(3, 64)),
    "bert": (lambda: __import__("hf_tiny_models").make_model("bert"), "bert.encoder.layer.2", 4, None),
    "hf_vit": (lambda: __import__("hf_tiny_models").make_model("vit"), "vit.layers.2", 4, None),
    "llama": (_llama, "model.layers.2", 4, None),
}


# what each family's copies zero to start as the identity (the last projection of each branch)
ZEROED = {
    "vit": ["mlp.3.weight/bias", "self_attention.out_proj.weight/bias"],
    "swin": ["mlp.3.weight/bias", "attn.proj.weight/bias"],
    "convnext": ["layer_scale"],
    "mobilenet_v3_small": ["'block.3.1'"],
    "bert": ["output.dense.weight/bias", "attention.output.dense.weight/bias"],
    "hf_vit": ["mlp.fc2.weight/bias", "attention.o_proj.weight/bias"],
    "llama": ["mlp.down_proj.weight", "self_attn.o_proj.weight"],
}


def _inputs(name: str):
    if name in ("bert", "hf_vit"):
        batch, y = _hf("bert" if name == "bert" else "vit")
        return (), batch, y
    if name == "llama":
        ids = torch.randint(2, 64, (2, 6), generator=torch.Generator().manual_seed(1))
        return (), {"input_ids": ids}, torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    return CASES[name][3]()


@pytest.mark.parametrize("name", list(CASES))
def test_ahbf_defaults_deepen_the_last_residual_block_as_the_identity(name):
    pytest.importorskip("transformers") if name in ("bert", "hf_vit", "llama") else None
    make, block, aux, _ = CASES[name]
    net = make()
    bm, okd = _method(net)
    (key, counts), = bm.spec.deepen.items()
    assert counts == [0, aux, 2 * aux, 3 * aux]
    assert bm.deepened[key]["block"] == block
    assert all(z in bm.deepened[key]["start"] for z in ZEROED[name]), bm.deepened[key]["start"]
    args, kwargs, y = _inputs(name)
    twins, _ = _method(net, init="copy")  # every replica a copy of leaf 0: only the deepening differs
    assert twins.spec.deepen == bm.spec.deepen
    bm.eval()
    with torch.no_grad():
        same = twins.eval()(*args, **kwargs).logits
        for z in same[1:]:  # the copies start as the identity: every leaf computes the original model
            torch.testing.assert_close(z, same[0], rtol=1e-4, atol=1e-5)
        out = bm(*args, **kwargs)
        ref = net.eval()(*args, **kwargs)
        ref = ref if isinstance(ref, torch.Tensor) else ref.logits
        torch.testing.assert_close(out.logits[0], ref, rtol=1e-5, atol=1e-6)
        exported = bm.export().eval()
        got = exported(*args, **kwargs)
        torch.testing.assert_close(got if isinstance(got, torch.Tensor) else got.logits, out.logits[0], rtol=0, atol=0)
        deep = bm.export(3).eval()
        got = deep(*args, **kwargs)
        torch.testing.assert_close(got if isinstance(got, torch.Tensor) else got.logits, out.logits[3],
                                   rtol=1e-5, atol=1e-6)
    sizes = [sum(p.numel() for p in deep_seg.parameters()) for deep_seg in (bm.segments[f"b{i}"] for i in range(4))]
    assert sizes[0] < sizes[1] < sizes[2] < sizes[3]
    assert "start as the identity" in bm.describe(*args, print_fn=None, **kwargs)
    opt = torch.optim.SGD(bm.parameters(), lr=0.01)
    okd.set_epoch(1, 2)
    bm.train()
    loss = okd(bm(*args, **kwargs), y)
    assert torch.isfinite(loss.total), loss.parts
    loss.total.backward()
    opt.step()


@pytest.mark.parametrize("make, key, aux", [
    (lambda: torchvision.models.resnet18(num_classes=5), "layer4", 2),
    (lambda: __import__("branchify.recipes.zoo.resnet", fromlist=["resnet20"]).resnet20(num_classes=5), "layer3", 4),
])
def test_resnets_keep_the_published_choice(make, key, aux):
    """The AHBF benchmark row was run with the last stage deepened by copies of its last block
    (torchvision: ``layer4`` by 2 per step, CIFAR: ``layer3`` by 4) zero-init at the last BN scale."""
    torch.manual_seed(0)
    bm, _ = _method(make(), branches=2)  # two leaves: the same choice, fewer 512-channel copies to build
    assert bm.spec.deepen == {key: [0, aux]}
    last = f"{key}.{len(make().get_submodule(key)) - 1}"
    assert bm.deepened[key]["block"] == last
    assert bm.deepened[key]["start"] == "the identity (the scale of its last normalisation layer 'bn2' at 0)"
    deep = bm.export(1)
    assert float(deep.get_submodule(f"{key}.{len(make().get_submodule(key))}").bn2.weight.detach().abs().sum()) == 0


def test_standard_init_deepens_a_non_residual_stack():
    torch.manual_seed(0)
    bm, _ = _method(torchvision.models.squeezenet1_1(num_classes=5), deepen_init="standard")
    (key, d), = bm.deepened.items()
    assert (d["block"], d["class"], d["start"]) == ("features.12", "Fire", "the architecture's own init")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(bm.export(2).eval()(x), bm.eval()(x).logits[2], rtol=1e-5, atol=1e-6)


def test_explicit_container_and_block_keys_still_work():
    from branchify.recipes.zoo.resnet import resnet20
    torch.manual_seed(0)
    bm, _ = _method(resnet20(num_classes=5), deepen_container="layer2", aux=1, split="layer2")
    assert bm.spec.deepen == {"layer2": [0, 1, 2, 3]} and bm.deepened["layer2"]["block"] == "layer2.2"
    # a block key: copies go right after the block, the container's later children move back
    net = _tv("mobilenet_v3_small").eval()
    bm = bf.branchify(net, bf.Spec(splits=["features.9"], fanout=[2], deepen={"features.11": [0, 2]}))
    deep = bm.export(1).eval()
    assert [type(m).__name__ for m in deep.features[11:]] == ["InvertedResidual"] * 3 + ["Conv2dNormActivation"]
    assert torch.equal(deep.features[14][0].weight, bm.segments["b1"].get_submodule("features.14.0").weight)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(deep(x), bm.eval()(x).logits[1], rtol=0, atol=0)
    with pytest.raises(bf.SpecError, match="inside a MobileNetV3"):
        bf.branchify(net, bf.Spec(splits=["features.9"], fanout=[2], deepen={"avgpool": [0, 1]}))


@pytest.mark.parametrize("family, zeroed", [
    ("mpnet", "output.dense.weight/bias"),  # its layers return tuples: copies read the hidden-states item
    ("gemma2", "mlp.down_proj.weight"),  # its norms scale by (1 + weight): the projections are zeroed
])
def test_hf_layers_returning_tuples_or_with_offset_norms_start_as_the_identity(family, zeroed):
    pytest.importorskip("transformers")
    H = __import__("hf_tiny_models")
    batch = H.make_zoo_batch(family, labels=False)
    twins, _ = _method(H.make_zoo_model(family), init="copy")
    (key, d), = twins.deepened.items()
    assert zeroed in d["start"], d["start"]
    with torch.no_grad():
        out = twins.eval()(**batch)
        for z in out.logits[1:]:
            torch.testing.assert_close(z, out.logits[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(twins.export().eval()(**batch).logits, out.logits[0], rtol=0, atol=0)
        deep = twins.export(3).eval()  # (a Hugging Face copy gets its own layer_idx: its own KV-cache slot)
        torch.testing.assert_close(deep(**batch).logits, out.logits[3], rtol=1e-5, atol=1e-6)
