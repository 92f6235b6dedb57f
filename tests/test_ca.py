"""Conditioning augmentation: a Gaussian per caption, sampled in training, its mean otherwise."""

import torch

from t2f.models.ca import ConditioningAugmentation


def test_samples_differ_per_draw_and_deterministic_mode_returns_the_mean():
    torch.manual_seed(0)
    ca = ConditioningAugmentation(text_dim=16, z_dim=8)
    s = torch.randn(4, 16)
    z1, mu, logvar = ca(s)
    z2, _, _ = ca(s)
    assert z1.shape == mu.shape == logvar.shape == (4, 8)
    assert not torch.allclose(z1, z2)  # diversity for one caption
    z, mu_det, _ = ca(s, deterministic=True)
    torch.testing.assert_close(z, mu_det)


def test_gradients_reach_the_head_through_the_sample():
    ca = ConditioningAugmentation(text_dim=16, z_dim=8)
    z, _, _ = ca(torch.randn(4, 16))
    z.square().sum().backward()
    assert ca.fc.weight.grad is not None and ca.fc.weight.grad.abs().sum() > 0


def test_sample_spread_follows_the_predicted_variance():
    ca = ConditioningAugmentation(text_dim=2, z_dim=1)
    with torch.no_grad():
        ca.fc.weight.zero_()
        ca.fc.bias.copy_(torch.tensor([3.0, 2 * torch.log(torch.tensor(0.5))]))  # mu = 3, sigma = 0.5
    z, _, _ = ca(torch.zeros(20000, 2), generator=torch.Generator().manual_seed(0))
    assert abs(z.mean().item() - 3.0) < 0.02 and abs(z.std().item() - 0.5) < 0.02
