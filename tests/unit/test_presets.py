"""Every preset end to end: builds in one call, trains on a fixed batch, exports its target leaf."""
import pytest
import torch
import torchvision

from branchify.methods import available_methods, method

TRAIN_STEPS = 30


@pytest.mark.parametrize("name", available_methods())
def test_preset_trains_and_exports(name, tiny_resnet):
    torch.manual_seed(0)
    net = tiny_resnet(num_classes=5)
    model, okd = method(name, net)
    assert model.aggregator is model.aggregator  # trained through model.parameters()
    okd.set_epoch(10, 10)  # ramps at full weight
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(TRAIN_STEPS):
        loss = okd(model(x), y)
        opt.zero_grad()
        loss.total.backward()
        opt.step()
        losses.append(loss.total.item())
    assert losses[-1] < 0.5 * losses[0], losses
    model.eval()
    student = model.export().eval()
    assert type(student) is type(net)
    assert not any(k.startswith("aggregator") for k in student.state_dict())
    with torch.no_grad():
        out = model(x)  # the deployed leaf: the temporal mean's when the method deploys it (PCL)
        deployed = out.temporal if getattr(model, "temporal", None) is not None and model.temporal.deploy else out
        assert torch.allclose(student(x), deployed.logits[model.spec.target], atol=1e-5)


@pytest.mark.parametrize("name", available_methods())
def test_preset_builds_on_torchvision_resnet18(name):
    torch.manual_seed(0)
    overrides = {"aux": 1} if name == "ahbf" else {}  # keep the deepened 512-channel leaves small
    model, okd = method(name, torchvision.models.resnet18(num_classes=10), **overrides)
    okd.set_epoch(0, 10)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
        loss = okd(out, torch.randint(0, 10, (2,)))
    assert out.num_leaves == model.num_leaves == okd.num_leaves
    assert torch.isfinite(loss.total)


def test_okddip_network_based_peers(tiny_resnet):
    torch.manual_seed(0)
    model, okd = method("okddip", tiny_resnet(num_classes=5), split="<input>")
    assert model.spec.splits == ["<input>"] and model.num_leaves == 4
    okd.set_epoch(10, 10)
    loss = okd(model(torch.randn(8, 3, 8, 8)), torch.randint(0, 5, (8,)))
    loss.total.backward()
    assert model.aggregator.w_l.weight.grad.abs().sum() > 0  # attention learns through the targets
    assert {"kd/leaf0", "kd/leaf1", "kd/leaf3"} <= set(loss.parts)
