"""bf16 / fp16 autocast: large logits, every aggregator, float32 results and finite gradients."""
import pytest
import torch
from torch import nn

from branchify.aggregators import AccuracyWeighted, Gate, HierarchicalTA, Mean, Pairwise, PeerAttention
from branchify.online_kd import OnlineKD
from branchify.outputs import BranchedOutput

AGGREGATORS = {
    "mean": lambda: Mean(), "gate": lambda: Gate(), "pairwise": lambda: Pairwise(),
    "attention": lambda: PeerAttention(), "attention_prob": lambda: PeerAttention(space="prob"),
    "ahbf": lambda: HierarchicalTA(), "md": lambda: AccuracyWeighted([0.9, 0.5, 0.0]),
}


def _low_precision_output(out, dtype):
    def cast(t):
        return t.detach().to(dtype).requires_grad_(True)

    return BranchedOutput([cast(z * 50 / z.abs().max()) for z in out.logits], [cast(f) for f in out.features],
                          [cast(f) for f in out.feature_maps], {k: cast(v) for k, v in out.cuts.items()},
                          out.leaf_paths)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_autocast_large_logits_are_stable(fake_model, output, name, dtype):
    torch.manual_seed(0)
    model = fake_model(num_leaves=3, feature_map_channels=16)
    okd = OnlineKD(model, AGGREGATORS[name](), temperature=1.0)
    out = _low_precision_output(output(k=3, feat=16), dtype)
    y = torch.randint(0, 5, (6,))
    with torch.autocast("cpu", dtype=dtype):
        loss = okd(model(out), y)
    assert loss.total.dtype == torch.float32 and torch.isfinite(loss.total)
    assert all(torch.isfinite(v).all() for v in loss.parts.values())
    loss.total.backward()
    for t in out.logits + [p for p in model.aggregator.parameters()]:
        assert t.grad is None or torch.isfinite(t.grad).all()
    # same numbers as an fp32 computation on the same (rounded) values: nothing ran in low precision
    model.aggregator.eval()  # freeze BN statistics so both passes see the same normalisation
    ref_out = BranchedOutput([z.float() for z in out.logits], [f.float() for f in out.features],
                             [f.float() for f in out.feature_maps], {k: v.float() for k, v in out.cuts.items()})
    with torch.autocast("cpu", dtype=dtype):
        low = okd(model(out), y).total
    assert torch.allclose(low, okd(model(ref_out), y).total, rtol=1e-5, atol=1e-5)


def test_autocast_linear_head_logits(fake_model):
    torch.manual_seed(0)
    head = nn.Linear(16, 10)
    with torch.no_grad():
        head.weight.mul_(40)
    model = fake_model(num_leaves=2)
    okd = OnlineKD(model, Pairwise(), temperature=1.0)
    x = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = [head(x), head(x + 0.1)]
        assert logits[0].dtype == torch.bfloat16 and logits[0].abs().max() > 50
        loss = okd(model(BranchedOutput(logits, [None] * 2, [None] * 2)), torch.randint(0, 10, (8,)))
    loss.total.backward()
    assert torch.isfinite(loss.total) and torch.isfinite(head.weight.grad).all()
