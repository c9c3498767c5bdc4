"""Nothing silently wrong: pickled losses, wrapped models, frozen and tied parameters, labels,
meta-device and eval-mode models, torch.export of a branched model, exports keeping metadata."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import branchify as bf
from branchify import Spec

from conftest import TinyCifarResNet


def _steps(model, okd, x, y, n, opt=None):
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(n):
        loss = okd(model(x), y).total
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


@pytest.mark.parametrize("name", ["one", "ahbf"])
def test_a_pickled_loss_resumes_exactly(name, one_thread):
    """The loss holds no module of the model: saved with the model's and optimiser's state dicts
    and loaded into a rebuilt model, training continues bitwise as if never interrupted."""
    torch.manual_seed(0)
    kw = {"aux": 1} if name == "ahbf" else {}
    model, okd = bf.method(name, TinyCifarResNet(), **kw)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
    okd.set_epoch(3, 10)
    opt = _steps(model, okd, x, y, 2)
    assert not any(isinstance(v, nn.Module) for v in vars(okd).values())
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "okd": okd}, buf)
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    ref_opt.load_state_dict(opt.state_dict())
    _steps(reference, okd, x, y, 2, ref_opt)

    torch.manual_seed(0)
    resumed, _ = bf.method(name, TinyCifarResNet(), **kw)
    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    resumed.load_state_dict(saved["model"])
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.05, momentum=0.9)
    opt2.load_state_dict(saved["opt"])
    assert saved["okd"].epoch == 3.0
    _steps(resumed, saved["okd"], x, y, 2, opt2)
    for (k, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    state = okd.state_dict()
    fresh = pickle.loads(pickle.dumps(okd))
    fresh.load_state_dict(state)
    assert fresh.ramp_value() == okd.ramp_value()
    with pytest.raises(ValueError, match="unknown keys \\['step'\\]"):
        fresh.load_state_dict({"step": 1})


def test_a_loss_on_a_wrapped_model_says_to_build_it_first():
    model = bf.branchify(TinyCifarResNet(), Spec(splits=["layer3"], fanout=[2]))
    with pytest.raises(TypeError, match=r"build the loss on the unwrapped model first.*okd = OnlineKD\(model, "
                                        r"aggregator\); model = DataParallel\(model\)"):
        bf.OnlineKD(nn.DataParallel(model), bf.aggregators.Gate())
    assert model.aggregator is None  # nothing was attached
    with pytest.raises(TypeError, match="needs a branched model"):
        bf.OnlineKD(TinyCifarResNet(), bf.aggregators.Gate())


def test_reinitialised_replicas_of_frozen_layers_train():
    net = torchvision.models.resnet18(num_classes=5)
    for n, p in net.named_parameters():
        p.requires_grad_(n.startswith("fc."))
    model, okd = bf.method("one", net)
    assert model.unfrozen == ["b1", "b2"]
    assert all(p.requires_grad for k in ("b1", "b2") for p in model.segments[k].parameters())
    b0 = dict(model.segments["b0"].named_parameters())
    assert not b0["layer4.0.conv1.weight"].requires_grad and b0["fc.weight"].requires_grad  # child 0 keeps flags
    assert not any(p.requires_grad for p in model.segments["trunk"].parameters())
    assert "trainable in these re-initialised replicas: ['b1', 'b2']" in model.describe(
        torch.randn(2, 3, 32, 32), print_fn=None)
    before = model.segments["b1"].get_parameter("layer4.0.conv1.weight").detach().clone()
    okd.set_epoch(10, 10)
    _steps(model, okd, torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,)), 1)
    assert not torch.equal(before, model.segments["b1"].get_parameter("layer4.0.conv1.weight"))


class Reused(nn.Module):
    """``emb`` runs before and after the cut at ``mid``."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(4, 4)
        self.mid = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.emb(self.mid(self.emb(x))))


def test_a_module_used_on_both_sides_of_a_cut_stays_shared_and_exports_exactly():
    torch.manual_seed(0)
    model = bf.branchify(Reused(), Spec(splits=["mid"], fanout=[2]))
    assert model.tied == {"emb.weight": [0, 1], "emb.bias": [0, 1]}
    trunk_w = model.segments["trunk"].get_parameter("emb.weight")
    assert all(model.segments[k].get_parameter("emb.weight") is trunk_w for k in ("b0", "b1"))
    okd = bf.OnlineKD(model, bf.aggregators.Pairwise())
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    _steps(model, okd, x, y, 3)
    for leaf in (0, 1):
        torch.testing.assert_close(model.export(leaf)(x), model(x).logits[leaf], atol=1e-6, rtol=0)


@pytest.mark.parametrize("labels, message", [
    (torch.tensor([2.7, 1.0, 0.0, 1.0]), "integer tensor.*float32"),
    (torch.tensor([True, False, True, True]), "integer tensor.*bool"),
    (torch.tensor([10, 1, 2, 3]), r"labels \[10\] are out of range for 10 classes: valid labels are 0..9, or -100"),
    (torch.eye(10)[:4], "integer tensor"),
    (torch.zeros(4, 10, dtype=torch.long), r"do not fit logits of shape \(4, 10\).*look one-hot: pass y.argmax\(-1\)"),
    (torch.zeros(3, dtype=torch.long), r"labels of shape \(3,\) do not fit logits of shape \(4, 10\)"),
])
def test_labels_are_validated_with_the_expected_form(fake_model, output, labels, message):
    model = fake_model(num_leaves=2)
    okd = bf.OnlineKD(model, bf.aggregators.Pairwise())
    with pytest.raises(ValueError, match=message):
        okd(model(output(k=2, b=4, classes=10)), labels)


def test_an_empty_batch_is_an_error(fake_model, output):
    model = fake_model(num_leaves=2)
    okd = bf.OnlineKD(model, bf.aggregators.Pairwise())
    with pytest.raises(ValueError, match="the batch is empty"):
        okd(model(output(k=2, b=0)), torch.zeros(0, dtype=torch.long))


def test_a_meta_device_model_branchifies_and_exports():
    with torch.device("meta"):
        net = torchvision.models.resnet18(num_classes=10)
    model, okd = bf.method("tsa", net)
    out = model(torch.empty(2, 3, 32, 32, device="meta"))
    assert out.logits[3].shape == (2, 10) and out.logits[3].is_meta
    student = model.export()
    assert next(student.parameters()).is_meta
    student.to_empty(device="cpu").load_state_dict(torchvision.models.resnet18(num_classes=10).state_dict())


def test_an_eval_mode_model_gets_an_eval_mode_aggregator():
    model, _ = bf.method("one", TinyCifarResNet().eval())
    assert not model.training and not model.aggregator.training
    model.train()
    assert model.aggregator.training


def test_torch_export_of_a_branched_model():
    torch.manual_seed(0)
    model, _ = bf.method("one", TinyCifarResNet())
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    program = torch.export.export(model, (x,))
    out, ref = program.module()(x), model(x)
    assert isinstance(out, bf.BranchedOutput) and out.leaf_paths == ref.leaf_paths
    for a, b in zip(out.logits + [out.targets.ce["teacher"]], ref.logits + [ref.targets.ce["teacher"]]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_export_keeps_state_dict_metadata_and_every_key():
    torch.manual_seed(0)
    net = torchvision.models.mnasnet0_5(num_classes=10)  # its _load_from_state_dict needs the version
    model = bf.branchify(net, Spec(splits=["layers.12"], fanout=[2]))
    sd = model.export_state_dict()
    assert list(sd) == list(net.state_dict()) and sd._metadata is not None
    student = model.export().eval()
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(student(x), model(x).logits[0], atol=1e-5, rtol=0)
    assert F.cross_entropy(student(x), torch.tensor([0, 1])).isfinite()
