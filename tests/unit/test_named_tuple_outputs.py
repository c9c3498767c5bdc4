"""A model whose training-mode forward returns a named tuple with the logits first (torchvision's
GoogLeNet returns GoogLeNetOutputs(logits, aux2, aux1) with aux_logits=True): the leaves are the
logits field, the loss trains, and export reproduces the deployed leaf."""
from __future__ import annotations

import warnings

import torch
from torchvision import models as tvm

import branchify as bf


def test_googlenet_in_training_mode_branches_on_its_logits_field():
    torch.manual_seed(0)
    net = tvm.googlenet(num_classes=10, init_weights=False)  # aux_logits=True: a named tuple in training
    assert net.training and net.aux_logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, okd = bf.method("one", net)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 1])
    model.train()
    okd.set_epoch(1, 2)
    out = model(x)
    assert all(isinstance(z, torch.Tensor) and z.shape == (2, 10) for z in out.logits)
    loss = okd(out, y)
    assert torch.isfinite(loss.total)
    loss.total.backward()
    model.eval()
    with torch.no_grad():
        exported = model.export().eval()
        assert type(exported) is tvm.GoogLeNet
        torch.testing.assert_close(exported(x), model(x).logits[model.target], atol=1e-5, rtol=0)
