"""init="pretrained": replicas copy the pretrained weights, each leaf but leaf 0 gets a fresh task head.

Checked on leaf exports against the original state_dict (exact equality for what is copied), on
DML / ONE / TSA trees, with a model_fn donor, with tied heads, with noise, for network peers, and
for the automatic choice through a plugin (explicit init= wins) and timm's trained-weights signal.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

import branchify as bf
from branchify.registry import _PLUGINS, Plugin, register_plugin
from branchify.surgery.pretrained import looks_trained


def _pretrained_resnet(seed: int = 0) -> nn.Module:
    """A torchvision ResNet-18 whose weights are not at their init (as after pretraining)."""
    torch.manual_seed(seed)
    net = torchvision.models.resnet18(num_classes=5)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    net.train()
    net(torch.randn(4, 3, 32, 32))  # running statistics move, as after training
    return net.eval()


def _diff(a: dict, b: dict) -> list[str]:
    return sorted(k for k in a if not torch.equal(a[k], b[k]))


HEAD = ["fc.bias", "fc.weight"]


@pytest.mark.parametrize("name,leaves", [("one", 3), ("dml", 2), ("tsa", 4)])
def test_replicas_equal_the_pretrained_weights_except_the_head(name, leaves):
    net = _pretrained_resnet()
    sd = net.state_dict()
    bm, _ = bf.method(name, net, init="pretrained")
    assert bm.spec.num_leaves == leaves
    exports = [bm.export(i).state_dict() for i in range(leaves)]
    assert _diff(sd, exports[0]) == []                    # leaf 0 is exactly the model
    for e in exports[1:]:
        assert _diff(sd, e) == HEAD                       # everything else copied, the head fresh
    heads = [e["fc.weight"] for e in exports]
    assert all(not torch.equal(heads[i], heads[j]) for i in range(leaves) for j in range(i))
    bound = 1 / 512 ** 0.5                                # nn.Linear's reset_parameters: U(-1/sqrt(in), 1/sqrt(in))
    assert all(h.abs().max() <= bound for h in heads[1:])
    assert "task head ['fc'] re-initialised in leaves " + str(list(range(1, leaves))) in bm.init_used
    assert "reset_parameters()" in bm.init_used
    assert "replica init: pretrained" in bm.describe(torch.randn(2, 3, 32, 32), print_fn=None)


def test_head_from_a_model_fn_donor_is_the_donors():
    net = _pretrained_resnet()

    def make() -> nn.Module:
        torch.manual_seed(123)
        return torchvision.models.resnet18(num_classes=5)

    donor_fc = make().fc.weight
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bm, _ = bf.method("one", net, init="pretrained", model_fn=make)
    assert torch.equal(bm.export(1).fc.weight, donor_fc) and torch.equal(bm.export(2).fc.weight, donor_fc)
    assert _diff(net.state_dict(), bm.export(1).state_dict()) == HEAD
    assert "model_fn()" in bm.init_used


def test_init_noise_perturbs_copies_off_leaf_zero_only():
    net = _pretrained_resnet()
    sd = net.state_dict()
    torch.manual_seed(0)
    bm, _ = bf.method("one", net, init="pretrained", init_noise=0.01)
    assert _diff(sd, bm.export(0).state_dict()) == []
    e1 = bm.export(1).state_dict()
    w, w1 = sd["layer4.1.conv2.weight"], e1["layer4.1.conv2.weight"]
    rel = (w1 - w).std() / w.std()
    assert 0.005 < rel < 0.02                             # noise of 0.01 x the tensor's std
    assert torch.equal(e1["layer1.0.conv1.weight"], sd["layer1.0.conv1.weight"])  # the shared trunk untouched
    assert "noise of 0.01" in bm.init_used
    with pytest.raises(bf.SpecError, match="init_noise=0.01 .* needs init='pretrained'"):
        bf.method("one", net, init="shuffle", init_noise=0.01)


class TinyLM(nn.Module):
    """An embedding and an output layer sharing one weight (a tied LM head)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.mix = nn.Linear(6, 6)
        self.out = nn.Linear(6, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.mix(self.emb(x))).mean(1))


def test_tied_head_is_never_reinitialised_and_says_so():
    torch.manual_seed(0)
    lm = TinyLM()
    sd = lm.state_dict()
    with pytest.warns(UserWarning, match="no parameter of its own to re-initialise"):
        bm, _ = bf.method("dml", lm, init="pretrained")
    assert _diff(sd, bm.export(1).state_dict()) == []     # the embedding kept its pretrained values
    assert "is tied to the rest of the network" in bm.init_used
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        noisy, _ = bf.method("dml", lm, init="pretrained", init_noise=0.05)
    assert _diff(sd, noisy.export(1).state_dict()) != []


class Marked(nn.Sequential):
    """A model class a test plugin reports as pretrained."""


@pytest.fixture
def pretrained_plugin():
    plugin = register_plugin(Plugin("test-pretrained", matches=lambda m: isinstance(m, Marked),
                                    pretrained=lambda m: "marked as pretrained by the test plugin",
                                    head=lambda m: ["2"]))
    yield plugin
    _PLUGINS.remove(plugin)


def _marked() -> Marked:
    torch.manual_seed(0)
    return Marked(nn.Flatten(), nn.Linear(8, 8), nn.Linear(8, 3))


def test_plugin_detection_chooses_pretrained_and_explicit_init_wins(pretrained_plugin):
    net = _marked()
    sd = net.state_dict()
    bm, _ = bf.method("dml", net)
    assert bm.init_used.startswith("pretrained:")
    assert "chosen automatically: marked as pretrained by the test plugin" in bm.init_used
    assert _diff(sd, bm.export(1).state_dict()) == ["2.bias", "2.weight"]   # the plugin's head
    for init in ("shuffle", "reset", "pretrained"):
        explicit, _ = bf.method("dml", net, init=init)
        assert explicit.init_used.startswith(init) and "chosen automatically" not in explicit.init_used
    shuffled, _ = bf.method("dml", net, init="shuffle")
    assert "1.weight" in _diff(sd, shuffled.export(1).state_dict())


def test_plain_models_are_not_detected():
    net = _pretrained_resnet()
    bm, _ = bf.method("one", net)
    assert bm.init_used.startswith("shuffle")            # plain / torchvision models take the explicit option


def test_looks_trained():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=5)
    assert not looks_trained(net)
    net.train()
    net(torch.randn(2, 3, 32, 32))
    assert looks_trained(net)
    assert not looks_trained(nn.Linear(3, 3))


def test_pretrained_peers_for_a_cohort():
    net = _pretrained_resnet()
    sd = net.state_dict()
    peers = bf.pretrained_peers(net, 3)
    assert _diff(sd, peers[0].state_dict()) == []
    assert all(_diff(sd, p.state_dict()) == HEAD for p in peers[1:])
    assert peers[1].branchify_init.startswith("pretrained weights; head ['fc'] re-initialised")
    cohort = bf.Cohort(peers)
    assert len(cohort(torch.randn(2, 3, 32, 32)).logits) == 3
    with pytest.raises(bf.SpecError, match=r"\['head'\] are not modules"):
        bf.pretrained_peers(net, 2, head=["head"])


def test_timm_model_with_loaded_weights_is_detected(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    fresh = timm.create_model("resnet10t", num_classes=4)
    bm, _ = bf.method("one", fresh)
    assert bm.init_used.startswith("donor")
    fresh.train()
    fresh(torch.randn(2, 3, 32, 32))                     # stand-in for pretraining: statistics move
    torch.save(fresh.state_dict(), tmp_path / "w.pth")
    loaded = timm.create_model("resnet10t", pretrained=True, num_classes=4,
                               pretrained_cfg_overlay={"file": str(tmp_path / "w.pth")})
    assert _diff(fresh.state_dict(), loaded.state_dict()) == ["fc.bias", "fc.weight"]  # timm's own fresh head
    bm, _ = bf.method("one", loaded.eval())
    assert bm.init_used.startswith("pretrained:") and "normalisation layers hold trained values" in bm.init_used
    assert _diff(loaded.state_dict(), bm.export(1).state_dict()) == ["fc.bias", "fc.weight"]
    explicit, _ = bf.method("one", loaded, init="donor")
    assert explicit.init_used.startswith("donor")
