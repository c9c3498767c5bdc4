"""Export keeps the state of modules the traced forward never runs (an aux head used only in
training, like GoogLeNet's and Inception's): fx drops them from the traced graph module, so they
are found against the model itself and exported from the original."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import branchify as bf


class AuxNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.body = nn.Linear(8, 8)
        self.aux = nn.Linear(8, 3)  # runs only in training: not traced from an eval-mode model
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        out = self.fc(torch.relu(self.body(h)))
        if self.training:
            return out, self.aux(h)
        return out


def test_export_restores_an_unexecuted_aux_head():
    torch.manual_seed(0)
    net = AuxNet().eval()
    with pytest.warns(UserWarning, match=r"2 state_dict entries belong to modules the forward never runs \(\[.aux.weight., .aux.bias.\]"):
        bm = bf.branchify(net, bf.Spec(splits=["body"], fanout=[2]))
    x = torch.randn(5, 4)
    logits = bm.eval()(x).logits
    for leaf in range(bm.num_leaves):
        exported = bm.export(leaf)
        fresh = AuxNet().eval()
        fresh.load_state_dict(exported.state_dict(), strict=True)
        assert torch.equal(fresh.aux.weight, net.aux.weight)
        torch.testing.assert_close(fresh(x), logits[leaf], atol=1e-6, rtol=0)
