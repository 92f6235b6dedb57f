"""Fused Triton kernels for `bias_act` (forward and first-order backward).

One kernel source serves both directions (`BACKWARD` is a compile-time flag), so the
activation formulas exist once. Forward reads x once and writes y once, in place of the
reference's chain of elementwise ops (add, act, mul, clamp), each a full read and write.
Backward recomputes z = x + b and act(z) from the saved input rather than storing
intermediates, applies the activation's derivative, the gain and the clamp mask (zero gradient
where |output| reached the clamp, boundary included: torch 2.14's clamp does the same on CPU, torch
2.11's passed the gradient on the boundary on CUDA) and writes dx; db is
a float32-accumulated sum of dx over every dimension but `dim` (torch's reduction: the frozen
generator never asks for it).

Layout: the kernel sees a dense tensor as (outer, C, inner) in memory order, whatever the
logical order of its dimensions, so NCHW, channels-last and (N, C) inputs are all read in
place and the output keeps the input's strides. Only tensors with gaps or overlaps (slices,
expanded views) are copied with `.contiguous()` first.

Arithmetic is float32 inside the kernel for every input dtype (fp32, fp16, bf16); the result
is rounded once to x.dtype. The bias is first rounded to x.dtype, as the reference does.

Kernels call only Triton builtins, never triton.language's own @jit helpers (tl.sigmoid,
tl.zeros, ...): those are jitted when `import triton` runs, so they would break the
interpreter whenever TRITON_INTERPRET is set after that import (see dispatch.py).

Double backward is not supported: the generator these ops serve is frozen, and only
first-order gradients flow through it to the mapper. A backward with create_graph=True raises
a RuntimeError that says so, instead of silently returning a second derivative of zero.
"""

import functools
import math

import torch
import triton.language as tl

from t2f.ops.bias_act import bias_act_ref, resolve_params
from t2f.ops.dispatch import KernelUnavailable, cdiv, disable_triton, launch, next_power_of_2

TILE = 2048  # elements per program: enough work per thread to hide memory latency
NUM_WARPS = 4
SELU_ALPHA = tl.constexpr(1.6732632423543772848170429916717)
SELU_SCALE = tl.constexpr(1.0507009873554804934193349852946)


def _bias_act_kernel(
    x_ptr, b_ptr, dy_ptr, out_ptr,  # out is y (forward) or dx (backward)
    C, inner, n_cblocks, n_iblocks, alpha, gain, clamp,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CLAMP: tl.constexpr, BACKWARD: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
):
    pid = tl.program_id(0)
    i_block = pid % n_iblocks
    c_block = (pid // n_iblocks) % n_cblocks
    outer = pid // (n_iblocks * n_cblocks)
    c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    if BLOCK_I == 1:  # channels innermost in memory (channels-last, (N, C)): a 1-D tile vectorises
        mask = c < C
        offs = outer.to(tl.int64) * C + c  # (BLOCK_C,)
    else:
        i = i_block * BLOCK_I + tl.arange(0, BLOCK_I)  # (BLOCK_I,)
        mask = (c < C)[:, None] & (i < inner)[None, :]  # (BLOCK_C, BLOCK_I)
        offs = outer.to(tl.int64) * C * inner + (c * inner)[:, None] + i[None, :]

    z = tl.load(x_ptr + offs, mask=mask, other=0).to(tl.float32)
    if HAS_BIAS:  # the reference adds b.to(x.dtype): round the bias the same way
        b = tl.load(b_ptr + c, mask=c < C, other=0).to(x_ptr.dtype.element_ty).to(tl.float32)
        if BLOCK_I == 1:
            z += b
        else:
            z += b[:, None]

    # a = act(z); d = act'(z), the latter only traced when BACKWARD
    if ACT == "linear":
        a = z
        d = 1.0
    elif ACT == "relu":
        a = tl.maximum(z, 0.0)
        d = tl.where(z > 0, 1.0, 0.0)
    elif ACT == "lrelu":
        a = tl.where(z > 0, z, z * alpha)
        d = tl.where(z > 0, 1.0, alpha)
    elif ACT == "tanh":
        a = 2.0 * 1.0 / (1.0 + tl.exp(-2.0 * z)) - 1.0
        d = 1.0 - a * a
    elif ACT == "sigmoid":
        a = 1.0 / (1.0 + tl.exp(-z))
        d = a * (1.0 - a)
    elif ACT == "elu":
        e = tl.exp(tl.minimum(z, 0.0))  # min(): the unused branch must not overflow to inf
        a = tl.where(z > 0, z, e - 1.0)
        d = tl.where(z > 0, 1.0, e)
    elif ACT == "selu":
        e = tl.exp(tl.minimum(z, 0.0))
        a = SELU_SCALE * tl.where(z > 0, z, SELU_ALPHA * (e - 1.0))
        d = SELU_SCALE * tl.where(z > 0, 1.0, SELU_ALPHA * e)
    elif ACT == "softplus":  # torch's softplus: beta 1, linear above threshold 20
        a = tl.where(z > 20.0, z, tl.log(1.0 + tl.exp(tl.minimum(z, 20.0))))
        d = tl.where(z > 20.0, 1.0, 1.0 / (1.0 + tl.exp(-z)))
    else:  # swish
        s = 1.0 / (1.0 + tl.exp(-z))
        a = s * z
        d = s + z * s * (1.0 - s)
    y = a * gain

    if BACKWARD:
        dy = tl.load(dy_ptr + offs, mask=mask, other=0).to(tl.float32)
        dx = dy * gain * d
        if HAS_CLAMP:  # like torch.clamp (and NVlabs): no gradient where |y| reached clamp
            dx = tl.where((y > -clamp) & (y < clamp), dx, 0.0)
        tl.store(out_ptr + offs, dx.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        if HAS_CLAMP:
            y = tl.minimum(tl.maximum(y, -clamp), clamp)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def memory_view(x: torch.Tensor, dim: int):
    """(x, outer, C, inner) with x dense, so element (o, c, i) sits at o*C*inner + c*inner + i.

    Dense tensors of any dimension order are used in place; others are copied contiguous.
    """
    if x.is_contiguous():  # the common layouts first: the general path below costs more than a launch
        return x, math.prod(x.shape[:dim]), x.shape[dim], math.prod(x.shape[dim + 1 :])
    if x.ndim == 4 and dim == 1 and x.is_contiguous(memory_format=torch.channels_last):
        return x, x.numel() // max(x.shape[1], 1), x.shape[1], 1
    # size-1 dims have arbitrary strides and no bearing on the layout (except dim itself)
    by_stride = sorted((d for d in range(x.ndim) if x.shape[d] != 1 or d == dim), key=lambda d: -x.stride(d))
    expected, dense = 1, True
    for d in reversed(by_stride):
        dense &= x.shape[d] == 1 or x.stride(d) == expected
        expected *= x.shape[d]
    if not dense:
        x = x.contiguous()
        by_stride = list(range(x.ndim))
    inner = 1
    for d in by_stride[by_stride.index(dim) + 1 :]:
        inner *= x.shape[d]
    channels = x.shape[dim]
    return x, x.numel() // max(channels * inner, 1), channels, inner


@functools.lru_cache(maxsize=1024)
def tiling(channels: int, inner: int) -> tuple[int, int, int, int]:
    """(BLOCK_C, BLOCK_I, channel blocks, inner blocks) for a (C, inner) slab; cached, like everything
    on the launch path kept cheap: on an H200 a small layer's host time, not its kernel, set its speed."""
    block_i = min(next_power_of_2(inner), TILE)
    block_c = min(next_power_of_2(channels), TILE // block_i)
    return block_c, block_i, cdiv(channels, block_c), cdiv(inner, block_i)


def _run_kernel(view, b, dy, out, act, alpha, gain, clamp, backward):
    """Launch on `view` = memory_view(x, dim): (dense x, outer, C, inner)."""
    x, outer, channels, inner = view
    if channels * inner >= 2**31:
        raise ValueError(f"bias_act: {channels}x{inner} elements per outer index exceed the kernel's int32 offsets")
    block_c, block_i, n_cblocks, n_iblocks = tiling(channels, inner)
    launch(
        _bias_act_kernel, (outer * n_cblocks * n_iblocks,),
        x, x if b is None else b, x if dy is None else dy, out,
        channels, inner, n_cblocks, n_iblocks, alpha, gain, clamp,
        ACT=act, HAS_BIAS=b is not None, HAS_CLAMP=clamp >= 0, BACKWARD=backward,
        BLOCK_C=block_c, BLOCK_I=block_i, num_warps=NUM_WARPS,
    )  # fmt: skip
    return out


def _empty_like_dense(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor with x's strides (x's layout if dense, else contiguous)."""
    return torch.empty_like(x, memory_format=torch.preserve_format)


class _BiasAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b, dim, act, alpha, gain, clamp):
        view = memory_view(x, dim)
        x = view[0]
        y = _empty_like_dense(x)
        _run_kernel(view, b, None, y, act, alpha, gain, clamp, backward=False)
        ctx.save_for_backward(x, b)
        ctx.params = (dim, act, alpha, gain, clamp)
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():  # create_graph=True: a second derivative would silently be 0
            raise RuntimeError(
                "bias_act: the Triton kernels have no double backward (create_graph=True); "
                "use impl='ref' for higher-order gradients"
            )
        x, b = ctx.saved_tensors
        dim, act, alpha, gain, clamp = ctx.params
        if dy.stride() != x.stride():  # the kernel indexes x, dy and dx with the same offsets
            dy = _empty_like_dense(x).copy_(dy)
        try:
            dx = _run_kernel(memory_view(x, dim), b, dy, _empty_like_dense(x), act, alpha, gain, clamp, backward=True)
        except KernelUnavailable as error:
            disable_triton("bias_act", error)
            return _grads_via_reference(ctx, x, b, dy)
        db = None
        if ctx.needs_input_grad[1]:
            other_dims = [d for d in range(x.ndim) if d != dim]
            db = dx.sum(dim=other_dims, dtype=torch.float32).to(b.dtype)  # (C,)
        return dx, db, None, None, None, None, None


def _grads_via_reference(ctx, x, b, dy):
    """Backward through the reference, for when only the backward kernel fails to compile."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        b = None if b is None else b.detach().requires_grad_(ctx.needs_input_grad[1])
        y = bias_act_ref(x, b, *ctx.params)
        inputs = [x] + ([b] if ctx.needs_input_grad[1] else [])
        grads = torch.autograd.grad(y, inputs, dy)
    db = grads[1] if ctx.needs_input_grad[1] else None
    return grads[0], db, None, None, None, None, None


def bias_act(x, b=None, dim=1, act="linear", alpha=None, gain=None, clamp=None):
    """Triton version of t2f.ops.bias_act.bias_act_ref (same arguments, same results)."""
    alpha, gain, clamp = resolve_params(act, alpha, gain, clamp)
    if not -x.ndim <= dim < x.ndim:
        raise ValueError(f"bias_act: dim {dim} is out of range for a {x.ndim}-D tensor")
    dim %= x.ndim
    if b is not None and (b.ndim != 1 or b.shape[0] != x.shape[dim] or b.device != x.device):
        raise ValueError(
            f"bias_act: b must be 1-D with x.shape[{dim}] = {x.shape[dim]} entries on {x.device}; "
            f"got shape {tuple(b.shape)} on {b.device}"
        )
    if not x.is_floating_point():
        raise ValueError(f"bias_act: x must be a floating-point tensor, got {x.dtype}")
    if x.numel() == 0:
        return bias_act_ref(x, b, dim, act, alpha, gain, clamp)
    return _BiasAct.apply(x, b, dim, act, alpha, gain, clamp)
