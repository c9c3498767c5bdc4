"""Every user error raises (or warns) with a message that says what to do."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision import models as tvm

import branchify as bf
from toy_models import Stages, ToyResidual
from branchify import Spec, SpecError, TraceError


def test_unknown_split_lists_the_nearest_valid_names():
    with pytest.raises(SpecError) as err:
        bf.branchify(tvm.resnet18(), Spec(splits=["layer_4"], fanout=[2]))
    msg = str(err.value)
    assert "unknown split 'layer_4'" in msg and "'layer4'" in msg and "split_points" in msg


def test_splits_out_of_execution_order_are_rejected_with_the_right_order():
    with pytest.raises(SpecError, match=r"'layer3' runs before .*'layer4'.*\['layer3', 'layer4'\]"):
        bf.branchify(tvm.resnet18(), Spec(splits=["layer4", "layer3"], fanout=[2, 2]))


def test_split_after_the_classifier_is_rejected():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.post = nn.Identity()

        def forward(self, x):
            return self.fc(x), self.post(x)

    with pytest.raises(SpecError, match="not one logits tensor"):
        bf.branchify(Net(), Spec(splits=["post"], fanout=[2]))


def test_deepen_on_a_non_container_names_the_fix():
    stages = _stages()  # a block inside a container is a valid key ("layer2.0"); the head is not
    with pytest.raises(SpecError, match=r"'fc' is a Linear inside a Stages.*Name the stage"):
        bf.branchify(stages, Spec(splits=["layer2"], fanout=[2], deepen={"fc": [0, 1]}))


def test_deepen_on_a_stage_whose_last_block_changes_shape():
    net = tvm.resnet18()
    net.layer4 = net.layer4[:1]  # only the strided, channel-doubling block is left
    with pytest.raises(SpecError, match="does not keep the shape of its input"):
        bf.branchify(net, Spec(splits=["layer4"], fanout=[2], deepen={"layer4": [0, 1]}))


def test_deepen_removing_every_block_is_rejected():
    stages = _stages()
    with pytest.raises(SpecError, match="removes 2 blocks but it has only 2"):
        bf.branchify(stages, Spec(splits=["layer2"], fanout=[2], deepen={"layer2": [0, -2]}))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.gate = Gatey()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.gate(self.body(x)))


class Gatey(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
            return x * 2
        return x


def test_untraceable_model_names_the_module_and_the_leaf_module_fix():
    with pytest.raises(TraceError) as err:
        bf.branchify(DataDependent(), Spec(splits=["fc"], fanout=[2]))
    msg = str(err.value)
    assert "module 'gate' (Gatey)" in msg
    assert "Tracer(leaf_modules=['gate'])" in msg and "autowrap_functions" in msg
    assert "if x.sum() > 0" in msg


def test_the_suggested_leaf_module_fix_works():
    bm = bf.branchify(DataDependent(), Spec(splits=["fc"], fanout=[2]),
                      tracer=bf.Tracer(leaf_modules=["gate"]))
    assert len(bm(torch.randn(3, 4)).logits) == 2


def test_inplace_relu_at_the_cut_does_not_corrupt_the_shared_activation():
    torch.manual_seed(0)
    net = tvm.resnet18(num_classes=5)
    # resnet18.relu is ReLU(inplace=True) and is the first op after the cut.
    bm = bf.branchify(net, Spec(splits=["relu"], fanout=[3]))
    out = bm(torch.randn(2, 3, 32, 32))
    torch.stack(out.logits).sum().backward()  # would raise "modified by an inplace operation"
    assert all(p.grad is not None for p in bm.segments["trunk"].parameters())
    assert net.relu.inplace  # the user's model is untouched


def test_inplace_method_on_a_crossing_value_reads_a_clone():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 3)

        def forward(self, x):
            h = self.a(x)
            return self.b(h.mul_(2))

    torch.manual_seed(0)
    net = Net()
    bm = bf.branchify(net, Spec(splits=["b"], fanout=[2], init="copy")).eval()
    x = torch.randn(2, 4)
    out = bm(x)
    # Both leaves (identical copies) must see the same, once-doubled activation.
    torch.testing.assert_close(out.logits[0], net(x))
    torch.testing.assert_close(out.logits[1], net(x))


def test_bad_leaf_index_and_bad_inputs():
    bm = bf.branchify(tvm.resnet18(num_classes=3), Spec(splits=["layer4"], fanout=[2]))
    with pytest.raises(IndexError, match="leaves 0..1"):
        bm.export(5)
    with pytest.raises(TypeError, match=r"unexpected inputs \['y'\]"):
        bm(torch.randn(2, 3, 32, 32), y=1)


def test_init_donor_without_model_fn_says_what_to_pass():
    with pytest.raises(ValueError, match="init='donor' needs model_fn"):
        bf.branchify(tvm.resnet18(), Spec(splits=["layer4"], fanout=[2], init="donor"))


def _stages() -> Stages:
    torch.manual_seed(0)
    return Stages()
