"""ONE and DML train bitwise like their hand-written twins in the CPU benchmark's own loop.

``test_handwritten_equivalence.py`` copies weights across and compares a few SGD steps to a
tolerance; this test runs what the benchmark runs - ``recipes.regime.train_run`` with the
benchmark's trainee factories, each building its networks from the same seed - and requires the
trained leaves to give *identical* logits. It is why the README can say ONE's and DML's twins
reproduce on every seed, and it fails on any change to their trees, their initialisation order,
their losses or the training loop. (TSA's twin sums its two levels' gradients in another order, so
it agrees only to rounding; that is checked by the step-for-step test.)
"""
from __future__ import annotations

import pytest
import torch
from fashion_mnist import needs_fashion_mnist

from benchmarks.accuracy_cpu import trainee_factory
from branchify.recipes.regime import Regime, train_run

TINY = Regime("tiny", depth=8, image_size=14, train_size=100, epochs=2, eval_points=1, test_size=300)


def _trained_logits(method: str, implementation: str, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    made = []
    factory = trainee_factory(method, implementation, TINY)

    def make():
        made.append(factory())
        return made[0]

    record = train_run(TINY, make, seed=0, method=method, implementation=implementation)
    made[0].model.eval()
    with torch.no_grad():
        return torch.stack(list(made[0].leaves(x))), record


@needs_fashion_mnist
@pytest.mark.parametrize("method", ["one", "dml"])
def test_branchify_trains_bitwise_like_its_hand_written_twin(method, one_thread):
    x = torch.randn(32, 1, 14, 14, generator=torch.Generator().manual_seed(5))
    ours, ours_record = _trained_logits(method, "branchify", x)
    hand, hand_record = _trained_logits(method, "handwritten", x)
    assert ours.shape == hand.shape == (3 if method == "one" else 2, 32, 10)
    assert torch.equal(ours, hand), f"max difference {(ours - hand).abs().max().item():.3g}"
    assert ours_record["leaf_accs"] == hand_record["leaf_accs"]
