"""Conditioning augmentation (StackGAN): text feature s -> Gaussian N(mu(s), diag sigma^2(s)) -> z.

In training z is sampled with the reparameterisation trick, so one caption maps to many
faces and the KL term (t2f.losses.kl_divergence) keeps the Gaussian near N(0, I), the prior
the generator's mapping network was trained on. In deterministic mode z = mu.
"""

import torch
from torch import nn


class ConditioningAugmentation(nn.Module):
    def __init__(self, text_dim: int, z_dim: int):
        super().__init__()
        self.text_dim, self.z_dim = text_dim, z_dim
        self.fc = nn.Linear(text_dim, 2 * z_dim)  # -> (mu, log sigma^2)

    def forward(self, s: torch.Tensor, deterministic: bool = False, generator: torch.Generator = None):
        """s (B, text_dim) -> z, mu, logvar, each (B, z_dim)."""
        assert s.ndim == 2 and s.shape[1] == self.text_dim, (tuple(s.shape), self.text_dim)
        mu, logvar = self.fc(s.to(self.fc.weight.dtype)).chunk(2, dim=1)  # (B, Z) each
        if deterministic:
            return mu, mu, logvar
        eps = torch.randn(mu.shape, device=mu.device, dtype=mu.dtype, generator=generator)
        return mu + eps * torch.exp(0.5 * logvar), mu, logvar
