"""StyleGAN2 mapping network z -> w, key-compatible with NVlabs' `mapping.*`.

Pixel-normalised z (plus an embedded label when c_dim > 0) goes through `num_layers` fully
connected layers with equalised learning rate and a 0.01 learning-rate multiplier, then is
broadcast to `num_ws` style vectors. `w_avg` tracks the mean w for the truncation trick.
Parameters are stored exactly as NVlabs stores them (weight divided by the lr multiplier, runtime
gains applied in forward) so official weights load key for key and behave identically.
"""

import numpy as np
import torch
from torch import nn

from t2f.ops import bias_act


def normalize_2nd_moment(x, dim=1, eps=1e-8):
    """Scale each vector to unit root-mean-square (StyleGAN's pixel norm)."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


class FullyConnectedLayer(nn.Module):
    """Linear layer with equalised learning rate: weights ~ N(0, 1/lr^2), scaled at runtime."""

    def __init__(self, in_features, out_features, bias=True, activation="linear", lr_multiplier=1.0,
                 bias_init=0.0, impl="auto"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.activation, self.impl = activation, impl
        self.weight = nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        # The runtime gains make Adam-style updates equally fast for every layer (equalised lr).
        self.weight_gain = lr_multiplier / np.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x):
        w = self.weight.to(x.dtype) * self.weight_gain  # (out, in)
        b = self.bias
        if b is not None:
            b = b.to(x.dtype)
            if self.bias_gain != 1:
                b = b * self.bias_gain
        if self.activation == "linear" and b is not None:
            return torch.addmm(b.unsqueeze(0), x, w.t())  # (B, out): GEMM with bias epilogue
        return bias_act(x.matmul(w.t()), b, act=self.activation, impl=self.impl)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, activation={self.activation}"


class MappingNetwork(nn.Module):
    """z (B, z_dim) [+ c (B, c_dim)] -> ws (B, num_ws, w_dim)."""

    def __init__(self, z_dim, c_dim, w_dim, num_ws, num_layers=8, lr_multiplier=0.01, w_avg_beta=0.998):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.num_ws = z_dim, c_dim, w_dim, num_ws
        self.num_layers, self.lr_multiplier, self.w_avg_beta = num_layers, lr_multiplier, w_avg_beta
        embed_features = w_dim if c_dim > 0 else 0
        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, embed_features)
        features = [z_dim + embed_features] + [w_dim] * num_layers
        for idx in range(num_layers):
            layer = FullyConnectedLayer(features[idx], features[idx + 1], activation="lrelu", lr_multiplier=lr_multiplier)
            setattr(self, f"fc{idx}", layer)
        self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(self, z, c=None, truncation_psi=1, truncation_cutoff=None, update_emas=False):
        x = None
        if self.z_dim > 0:
            assert z.ndim == 2 and z.shape[1] == self.z_dim, (tuple(z.shape), self.z_dim)
            x = normalize_2nd_moment(z.float())  # (B, z_dim)
        if self.c_dim > 0:
            assert c is not None and c.shape[1:] == (self.c_dim,), f"mapping needs labels c of shape (B, {self.c_dim})"
            y = normalize_2nd_moment(self.embed(c.float()))  # (B, w_dim)
            x = torch.cat([x, y], dim=1) if x is not None else y
        for idx in range(self.num_layers):
            x = getattr(self, f"fc{idx}")(x)  # (B, w_dim)

        if update_emas:  # exponential moving average of w, the centre used by truncation
            self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        ws = x.unsqueeze(1).repeat([1, self.num_ws, 1])  # (B, num_ws, w_dim)
        if truncation_psi != 1:
            cutoff = self.num_ws if truncation_cutoff is None else truncation_cutoff
            head = self.w_avg.lerp(ws[:, :cutoff], truncation_psi)
            ws = torch.cat([head, ws[:, cutoff:]], dim=1)  # out of place, so autograd sees it
        return ws

    def extra_repr(self):
        return f"z_dim={self.z_dim}, c_dim={self.c_dim}, w_dim={self.w_dim}, num_ws={self.num_ws}"
