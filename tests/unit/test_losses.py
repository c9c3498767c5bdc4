"""Loss primitives against hand-written formulas: KL at temperature, CE, masking, mixtures."""
import math

import pytest
import torch

from branchify.functional import (cross_entropy, kl_div_logits, kl_div_log_probs, kl_div_mixture, kl_div_probs,
                              mixture_log_probs, valid_mask)


def test_kl_div_logits_matches_formula(ref):
    g = torch.Generator().manual_seed(1)
    t, s = torch.randn(7, 11, generator=g) * 4, torch.randn(7, 11, generator=g) * 4
    for T in (1.0, 3.0, 4.5):
        assert torch.allclose(kl_div_logits(t, s, T), ref.kl(t, s, T), atol=1e-6)


def test_kl_is_teacher_to_student_direction():
    t, s = torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 0.0]])
    p = torch.softmax(t, -1)
    expected = (p * (p.log() - math.log(1 / 3))).sum()
    assert torch.allclose(kl_div_logits(t, s, 1.0), expected, atol=1e-6)
    assert not torch.allclose(kl_div_logits(s, t, 1.0), expected, atol=1e-3)


def test_kl_zero_probability_teacher_is_finite():
    teacher_log = torch.tensor([[0.0, float("-inf")]])
    student_log = torch.log_softmax(torch.tensor([[1.0, 2.0]], requires_grad=True), -1)
    kl = kl_div_log_probs(teacher_log, student_log)
    assert torch.isfinite(kl)
    assert torch.allclose(kl, -student_log[0, 0], atol=1e-6)


def test_cross_entropy_matches_formula(ref):
    z, y = torch.randn(9, 6), torch.randint(0, 6, (9,))
    assert torch.allclose(cross_entropy(z, y), ref.ce(z, y), atol=1e-6)


def test_token_mask_averages_over_real_tokens(ref):
    g = torch.Generator().manual_seed(2)
    t, s = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    y = torch.randint(0, 7, (2, 5), generator=g)
    y[0, 3:] = -100
    y[1, 4] = -100
    keep = y != -100
    mask = valid_mask(y, s)
    assert torch.equal(mask, keep)
    assert torch.allclose(kl_div_logits(t, s, 2.0, mask), ref.kl(t[keep], s[keep], 2.0), atol=1e-6)
    assert torch.allclose(cross_entropy(s, y), ref.ce(s[keep], y[keep]), atol=1e-6)


def test_all_padding_gives_zero_not_nan():
    s = torch.randn(2, 3, 4, requires_grad=True)
    y = torch.full((2, 3), -100)
    ce, kl = cross_entropy(s, y), kl_div_logits(s.detach() + 1, s, 3.0, valid_mask(y, s))
    assert ce.item() == 0.0 and kl.item() == 0.0
    (ce + kl).backward()
    assert torch.isfinite(s.grad).all()


def test_label_shape_mismatch_is_explained():
    with pytest.raises(ValueError, match="labels must have the logits' shape"):
        valid_mask(torch.zeros(3, dtype=torch.long), torch.zeros(4, 5))


def test_mixture_of_probabilities(ref):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(3, 5, 8, generator=g) * 3
    w = torch.tensor([0.5, 0.3, 0.2])
    T = 3.0
    p_mix = sum(w[k] * torch.softmax(z[k] / T, -1) for k in range(3))
    assert torch.allclose(mixture_log_probs(z, w.log(), T).exp(), p_mix, atol=1e-6)
    s = torch.randn(5, 8, generator=g)
    assert torch.allclose(kl_div_mixture(z, w.log(), s, T), ref.kl_probs(p_mix, s, T), atol=1e-6)
    assert torch.allclose(kl_div_probs(p_mix, s, T), ref.kl_probs(p_mix, s, T), atol=1e-6)


def test_mixture_with_zero_weight_has_finite_gradient():
    z = torch.randn(2, 4, 6, requires_grad=True)
    s = torch.randn(4, 6, requires_grad=True)
    loss = kl_div_mixture(z, torch.log(torch.tensor([1.0, 0.0])), s, 2.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all() and torch.isfinite(s.grad).all()
    assert torch.allclose(loss, kl_div_logits(z[0], s, 2.0), atol=1e-6)
