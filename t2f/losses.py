"""The training losses of METHOD.md as pure functions: the CA KL term and the text-reconstruction loss.

    L = λ1·L_KL + λ2·L_TRL,   L_TRL = caption cross-entropy + attention_weight · attention penalty

Reductions (chosen so the numbers do not depend on batch size or caption length):
- `kl_divergence`: averaged over the latent dimensions and the batch, as StackGAN's reference
  code computes it (a mean over all elements). A sum over dimensions would weigh the prior 512x
  (32x in the toy world) more against the caption loss and pin the CA head to N(0, I): in the
  toy world the text then never reached z (the KL term stayed near its floor and the caption
  loss on generated faces stayed flat).
- `caption_cross_entropy`: averaged over the real (non-<pad>) target tokens of the whole batch.
  METHOD writes a sum over tokens; the mean only rescales it, and keeps λ2 = 5 meaningful for
  captions of any length.
- `attention_penalty`: (1 − Σ_t β_ti)² averaged over the L image positions and the batch,
  counting only real steps. METHOD writes a sum over positions; with the cross-entropy a mean
  over tokens, the sum would outweigh it L-fold (L = 196 on the paper presets) and drown the
  caption signal that trains the mapper, so both are means. Since every step's β sums to 1 over
  positions, a caption of T < L real steps cannot reach 0: the floor is (1 − T/L)², reached by
  spreading attention evenly over time. What matters is the gradient, which pushes attention to
  visit every region.
"""

import torch
import torch.nn.functional as F

from t2f.tokens import PAD


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) ‖ N(0, I)) per latent dimension, mean over dims and batch. Scalar."""
    assert mu.shape == logvar.shape and mu.dim() == 2, f"expected two (B, D) tensors, got {mu.shape}, {logvar.shape}"
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).mean()


def caption_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, pad_id: int = PAD) -> torch.Tensor:
    """Mean negative log-likelihood of the real target tokens; <pad> targets count for nothing."""
    assert logits.dim() == 3 and targets.shape == logits.shape[:2], (
        f"expected logits (B, T, V) and targets (B, T), got {tuple(logits.shape)} and {tuple(targets.shape)}"
    )
    real = targets != pad_id  # (B, T)
    summed = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=pad_id, reduction="sum")
    # clamp: a batch of empty captions gives 0, not NaN
    return summed / real.sum().clamp(min=1)


def attention_penalty(alphas: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Doubly stochastic penalty (1 − Σ_t β_ti)² over real steps only, mean over positions i and the batch."""
    assert alphas.dim() == 3 and mask.shape == alphas.shape[:2], (
        f"expected alphas (B, T, L) and mask (B, T), got {tuple(alphas.shape)} and {tuple(mask.shape)}"
    )
    coverage = (alphas.float() * mask.unsqueeze(-1).float()).sum(dim=1)  # (B, L)
    return (1.0 - coverage).square().mean()


def text_reconstruction_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    alphas: torch.Tensor,
    attention_weight: float = 1.0,
    pad_id: int = PAD,
) -> tuple[torch.Tensor, dict]:
    """L_TRL = cross-entropy + attention_weight · penalty; parts are detached, for logging."""
    ce = caption_cross_entropy(logits, targets, pad_id)
    attention = attention_penalty(alphas, targets != pad_id)
    total = ce + attention_weight * attention
    return total, {"ce": ce.detach(), "attention": attention.detach()}
