"""Losses: KL of the CA head, masked caption cross-entropy, doubly stochastic attention penalty."""

import torch
import torch.nn.functional as F

from t2f.losses import attention_penalty, caption_cross_entropy, kl_divergence, text_reconstruction_loss
from t2f.tokens import PAD


def test_kl_is_zero_at_the_prior_and_positive_elsewhere():
    zeros = torch.zeros(4, 8)
    assert kl_divergence(zeros, zeros).item() == 0.0
    assert kl_divergence(torch.full((4, 8), 0.5), zeros).item() > 0
    assert kl_divergence(zeros, torch.full((4, 8), -1.0)).item() > 0
    # closed form per dim: 0.5 * (mu^2 + var - 1 - log var), mean over dims and batch (StackGAN's reduction)
    mu, logvar = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.zeros(2, 2)
    assert torch.isclose(kl_divergence(mu, logvar), torch.tensor(0.125))


def test_cross_entropy_ignores_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    targets = torch.tensor([[4, 5, 6, 2, PAD], [7, 2, PAD, PAD, PAD]])
    loss = caption_cross_entropy(logits, targets)
    changed = logits.clone()
    changed[0, 4] += 100.0
    changed[1, 2:] = torch.randn(3, 11) * 50
    assert torch.allclose(caption_cross_entropy(changed, targets), loss)
    real = targets != PAD
    expected = F.cross_entropy(logits[real], targets[real])
    assert torch.allclose(loss, expected)


def test_attention_penalty_zero_when_attention_covers_each_position_once():
    # T = L = 3 and each step attends to a different position: every column sums to 1 over time
    alphas = torch.eye(3).unsqueeze(0).repeat(2, 1, 1)  # (B, T, L)
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert attention_penalty(alphas, mask).item() == 0.0
    # all steps on position 0: ((1-3)^2 + 1 + 1) / 3 positions = 2
    stuck = torch.zeros(1, 3, 3)
    stuck[..., 0] = 1.0
    assert attention_penalty(stuck, torch.ones(1, 3, dtype=torch.bool)).item() == 2.0


def test_attention_penalty_ignores_padded_steps():
    alphas = torch.eye(3).unsqueeze(0)  # (1, 3, 3)
    padded = torch.cat([alphas, torch.full((1, 2, 3), 1 / 3)], dim=1)  # two extra pad steps
    mask = torch.tensor([[True, True, True, False, False]])
    assert attention_penalty(padded, mask).item() == 0.0


def test_text_reconstruction_loss_combines_parts():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 9, requires_grad=True)
    targets = torch.tensor([[4, 5, 2, PAD], [6, 2, PAD, PAD]])
    alphas = torch.rand(2, 4, 6).softmax(-1)
    total, parts = text_reconstruction_loss(logits, targets, alphas, attention_weight=0.5)
    assert set(parts) == {"ce", "attention"}
    assert torch.allclose(total, parts["ce"] + 0.5 * parts["attention"])
    total.backward()
    assert logits.grad[1, 2:].abs().sum() == 0  # padded steps get no gradient
