"""Checks shared by the model-zoo spreads (torchvision, timm): nothing left behind in the user's
model, and train/eval behaviour that follows the module.

Example:
    >>> before = snapshot(net); bf.method("one", net); assert_unchanged(net, before)   # doctest: +SKIP
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def _describe(value: Any) -> Any:
    """A comparable summary of an attribute value: containers by content, tensors by shape."""
    if isinstance(value, dict):
        return ("dict", tuple((str(k), _describe(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_describe(v) for v in value))
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    return (type(value).__name__, value if isinstance(value, (bool, int, float, str, type(None))) else None)


def snapshot(model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """Every module's attributes (``__dict__``: caches, flags, hooks) and the state_dict's values."""
    attrs = {name: {k: _describe(v) for k, v in vars(m).items()} for name, m in model.named_modules()}
    return attrs, {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: tuple[dict, dict[str, torch.Tensor]]) -> None:
    """``model`` has the attributes and state it had when ``before = snapshot(model)`` was taken."""
    attrs, sd = snapshot(model)
    changed = [n for n in attrs if attrs[n] != before[0].get(n)]
    assert not changed, f"branchify left state behind in the user's modules {changed[:5]}"
    assert sd.keys() == before[1].keys()
    assert all(torch.equal(v, before[1][k]) for k, v in sd.items())


def _logits(out: Any) -> torch.Tensor:
    """The logits of a forward (GoogLeNet / Inception return a tuple with aux logits in training)."""
    return out.logits if hasattr(out, "logits") else out


def check_train_eval(original: nn.Module, bm: nn.Module, x: torch.Tensor) -> bool:
    """Two eval passes of the branched model are identical; two training passes differ (for every
    leaf) exactly when two training passes of the original differ. Returns whether they do."""
    reference = copy.deepcopy(original).train()  # training passes update BatchNorm statistics
    torch.manual_seed(0)
    with torch.no_grad():
        random = not torch.equal(_logits(reference(x)), _logits(reference(x)))
        bm.eval()
        first, second = bm(x).logits, bm(x).logits
        assert all(torch.equal(a, b) for a, b in zip(first, second)), "eval passes differ"
        bm.train()
        torch.manual_seed(0)
        first, second = bm(x).logits, bm(x).logits
    differ = [not torch.equal(a, b) for a, b in zip(first, second)]
    assert differ == [random] * len(differ), (f"training passes of the original {'differ' if random else 'agree'}; "
                                              f"of the leaves: differ={differ}")
    return random


def train_step_moves_every_segment(bm: nn.Module, okd: Any, x: torch.Tensor, num_classes: int,
                                   zero_head: bool = False) -> None:
    """One clipped SGD step on ``x`` must move every segment of ``bm``; with a zero-initialised head
    (ViT, MLP-Mixer, ResMLP) no gradient reaches the body until the head has moved, so a second
    step is taken first."""
    bm.train()
    okd.set_epoch(0, 1)
    y = torch.arange(x.shape[0]) % num_classes
    opt = torch.optim.SGD(bm.parameters(), lr=0.01)
    before = {k: p.detach().clone() for k, p in bm.named_parameters()}
    for _ in range(2 if zero_head else 1):
        opt.zero_grad()
        loss = okd(bm(x), y).total
        assert torch.isfinite(loss), loss
        loss.backward()
        # A deep BatchNorm network on a batch of two (EfficientNet-B7) can take a gradient in the
        # thousands and blow up in one step at lr 0.01; a clipped step still moves every parameter.
        torch.nn.utils.clip_grad_norm_(bm.parameters(), 1.0)
        opt.step()
    for seg, module in bm.segments.items():
        moved = [not torch.equal(p, before[f"segments.{seg}.{k}"]) for k, p in module.named_parameters()]
        assert any(moved), f"segment {seg} did not change in a training step"


def check_branched(net: nn.Module, x: torch.Tensor, bm: nn.Module, okd: Any, method: str, num_classes: int,
                   atol: float) -> None:
    """The spread's contract for one branched architecture, before export: as many splits as the
    method's tree has levels, one logits tensor per leaf, leaf 0 equal to the original at init, a
    re-initialised sibling replica (not a copy), and a training step that moves every segment."""
    with torch.no_grad():
        ref = net(x)
    assert len(bm.spec.splits) == (1 if method == "one" else 2)
    with torch.no_grad():
        out = bm.eval()(x)
    assert len(out.logits) == bm.num_leaves and all(z.shape == (x.shape[0], num_classes) for z in out.logits)
    torch.testing.assert_close(out.logits[0], ref, atol=atol, rtol=0)
    sibling = bm.segments["b1"]  # a re-initialised replica of b0
    assert any(not torch.equal(p, q) for p, q in zip(bm.segments["b0"].parameters(), sibling.parameters()))
    train_step_moves_every_segment(bm, okd, x, num_classes, zero_head=bool((ref == 0).all()))
