"""Bias add + activation + gain + clamp, the elementwise tail of every StyleGAN2 layer.

Semantics follow NVlabs' `bias_act` so that official weights behave identically: the output
is `clamp(act(x + b, alpha) * gain, -clamp, clamp)`, with each activation's default alpha and
gain (leaky ReLU: alpha 0.2, gain sqrt(2)).
"""

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from t2f.ops.dispatch import KernelUnavailable, choose_impl, disable_triton


@dataclass(frozen=True)
class Activation:
    func: Callable[[torch.Tensor, float], torch.Tensor]
    def_alpha: float
    def_gain: float


ACTIVATIONS = {
    "linear": Activation(lambda x, a: x, 0.0, 1.0),
    "relu": Activation(lambda x, a: torch.relu(x), 0.0, math.sqrt(2)),
    "lrelu": Activation(lambda x, a: torch.nn.functional.leaky_relu(x, a), 0.2, math.sqrt(2)),
    "tanh": Activation(lambda x, a: torch.tanh(x), 0.0, 1.0),
    "sigmoid": Activation(lambda x, a: torch.sigmoid(x), 0.0, 1.0),
    "elu": Activation(lambda x, a: torch.nn.functional.elu(x), 0.0, 1.0),
    "selu": Activation(lambda x, a: torch.nn.functional.selu(x), 0.0, 1.0),
    "softplus": Activation(lambda x, a: torch.nn.functional.softplus(x), 0.0, 1.0),
    "swish": Activation(lambda x, a: torch.sigmoid(x) * x, 0.0, math.sqrt(2)),
}


def resolve_params(act: str, alpha: Optional[float], gain: Optional[float], clamp: Optional[float]):
    """Fill in an activation's defaults; returns (alpha, gain, clamp) with clamp < 0 meaning none."""
    if act not in ACTIVATIONS:
        raise ValueError(f"bias_act: unknown act {act!r}; choose from {sorted(ACTIVATIONS)}")
    spec = ACTIVATIONS[act]
    alpha = float(spec.def_alpha if alpha is None else alpha)
    gain = float(spec.def_gain if gain is None else gain)
    clamp = float(-1 if clamp is None else clamp)
    return alpha, gain, clamp


def bias_act_ref(x, b=None, dim=1, act="linear", alpha=None, gain=None, clamp=None):
    """Reference implementation in plain PyTorch ops (autograd gives the backward)."""
    alpha, gain, clamp = resolve_params(act, alpha, gain, clamp)
    if b is not None:
        assert b.ndim == 1 and b.shape[0] == x.shape[dim], (tuple(b.shape), tuple(x.shape), dim)
        x = x + b.reshape([-1 if i == dim else 1 for i in range(x.ndim)]).to(x.dtype)
    x = ACTIVATIONS[act].func(x, alpha)
    if gain != 1:
        x = x * gain
    if clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x


def bias_act(x, b=None, dim=1, act="linear", alpha=None, gain=None, clamp=None, impl="auto"):
    """Fused bias + activation: `x` any shape, `b` a 1-D bias along `dim` (or None)."""
    if choose_impl("bias_act", impl, x) == "triton":
        try:
            from t2f.ops import triton_bias_act

            return triton_bias_act.bias_act(x, b, dim, act, alpha, gain, clamp)
        except (ImportError, KernelUnavailable) as error:  # Triton cannot run here; see dispatch.py
            disable_triton("bias_act", error)
    return bias_act_ref(x, b, dim, act, alpha, gain, clamp)
