"""Per-leaf accuracy, ensemble accuracy and OKDDip's peer diversity."""
import math

import pytest
import torch

from branchify.metrics import ensemble_accuracy, ensemble_probs, leaf_accuracies, peer_diversity
from branchify.outputs import BranchedOutput


def test_leaf_and_ensemble_accuracy():
    z0 = torch.tensor([[5.0, 0.0], [5.0, 0.0], [0.0, 1.0]])
    z1 = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 5.0]])
    y = torch.tensor([0, 1, 1])
    out = BranchedOutput([z0, z1], [None] * 2, [None] * 2)
    assert leaf_accuracies(out, y) == pytest.approx([2 / 3, 2 / 3])
    # mean of probabilities (not logits): sample 0 -> class 0, sample 1 -> class 0, sample 2 -> class 1
    assert ensemble_accuracy(out, y) == pytest.approx(2 / 3)
    assert torch.allclose(ensemble_probs(out), (z0.softmax(-1) + z1.softmax(-1)) / 2)
    assert ensemble_accuracy(out, y, leaves=[1]) == pytest.approx(2 / 3)


def test_peer_diversity_matches_okddip_dist():
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(5, 7, generator=g) * 2 for _ in range(4)]
    peers = [0, 1, 2]
    p = [torch.softmax(logits[k], -1) for k in peers]
    per_sample = []
    for b in range(5):
        pairs = [torch.sqrt(((p[i][b] - p[j][b]) ** 2).sum()) for i in range(3) for j in range(i + 1, 3)]
        per_sample.append(sum(pairs) / 3)
    assert peer_diversity(logits, leaves=peers) == pytest.approx(float(sum(per_sample) / 5), abs=1e-6)


def test_token_level_metrics_skip_padding():
    z = torch.tensor([[[2.0, 0.0], [0.0, 2.0]]])
    y = torch.tensor([[0, -100]])
    assert leaf_accuracies([z, z], y) == [1.0, 1.0]
    assert peer_diversity([z, z], labels=y) == 0.0
    assert math.isnan(leaf_accuracies([z], torch.full((1, 2), -100))[0])


def test_metric_errors():
    with pytest.raises(ValueError, match="two leaves"):
        peer_diversity([torch.zeros(1, 2)])
    with pytest.raises(ValueError, match="not leaf indices"):
        ensemble_accuracy([torch.zeros(1, 2)], torch.zeros(1, dtype=torch.long), leaves=[3])
