"""What only a GPU can check: the batched form on CUDA, and compile with CUDA graphs.

Skipped without CUDA (CI has none); run on a GPU machine with ``pytest tests/test_cuda.py``.
"""
from __future__ import annotations

import copy

import pytest
import torch

import branchify as bf
from branchify.surgery.batched import wants_vmap
from branchify.recipes.zoo import resnet32

from batched_pairs import SPECS, _close, _pair, _sgd_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def _exact_fp32():
    # TF32 convolutions would differ between the grouped (batched) and per-replica (loop) kernels.
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch._dynamo.reset()
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
    torch._dynamo.reset()


def test_auto_batches_on_cuda():
    model = bf.branchify(resnet32(num_classes=5), SPECS["tsa"]).cuda()
    assert model.batch_groups and wants_vmap(model.batched, torch.device("cuda"))


@pytest.mark.parametrize("name", ["one", "tsa", "dml"])
def test_batched_equals_loop_on_cuda(name):
    loop, batched = _pair(SPECS[name])
    loop, batched = loop.cuda().train(), batched.cuda().train()
    x, y = torch.randn(8, 3, 16, 16, device="cuda"), torch.randint(0, 5, (8,), device="cuda")
    for _ in range(2):  # the second step runs on weights the first step updated in both forms
        out_l, out_b = _sgd_step(loop, x, y), _sgd_step(batched, x, y)
    for a, b in zip(out_b.logits, out_l.logits):
        _close(a, b, "logits")
    sd_l = loop.state_dict()
    for k, v in batched.state_dict().items():
        _close(v, sd_l[k], k)


@pytest.mark.parametrize("name, batched", [("one", False), ("tsa", True)], ids=["one-loop", "tsa-batched"])
def test_reduce_overhead_training_matches_eager(name, batched):
    """CUDA graphs replay forward and backward; the optimiser updates the captured weights in place
    and BatchNorm statistics are mutated inside the graph, so three steps must track eager."""
    torch.manual_seed(0)
    model, okd = bf.method(name, resnet32(num_classes=5), batched=batched)
    model = model.cuda().train()
    ref_model = copy.deepcopy(model)
    ref_okd = copy.copy(okd)
    ref_okd.aggregator = ref_model.aggregator
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.05, momentum=0.9)
    step = torch.compile(lambda x, y: okd(model(x), y).total, fullgraph=True, mode="reduce-overhead")
    g = torch.Generator().manual_seed(1)
    for s in range(4):
        x = torch.randn(16, 3, 32, 32, generator=g).cuda()
        y = torch.randint(0, 5, (16,), generator=g).cuda()
        okd.set_step(s, steps_per_epoch=1, total_epochs=4)
        ref_okd.set_step(s, steps_per_epoch=1, total_epochs=4)
        loss = step(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        want = ref_okd(ref_model(x), y).total
        ref_opt.zero_grad(set_to_none=True)
        want.backward()
        ref_opt.step()
        torch.testing.assert_close(loss.detach(), want.detach(), atol=2e-3, rtol=2e-3,
                                   msg=lambda m: f"step {s}: {m}")
    ref_sd = ref_model.state_dict()
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, ref_sd[k], atol=2e-3, rtol=2e-2, msg=lambda m: f"{k}: {m}")
