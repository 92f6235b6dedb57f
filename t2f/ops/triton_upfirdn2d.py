"""Fused Triton kernel for `upfirdn2d`: up-sample, pad/crop, FIR filter, down-sample in one pass.

Each program computes a tile of output pixels directly from the input, so the zero-inserted,
padded intermediate of the reference never exists in memory. For output row `oy` the filter
window starts at `oy * down - pad0` in up-sampled coordinates; only taps landing on a multiple
of `up` see a real input pixel, so the kernel walks just those taps (polyphase: ceil(fh / up)
rows of taps instead of fh, likewise for columns) and reads the matching filter entries.
Taps outside the input (padding, cropping, borders) are masked loads of zero.

Separable (1-D) filters are applied as their outer product, tap by tap; arithmetic is float32
throughout (filter and accumulator) and the result is rounded once to x.dtype, where the
reference rounds the filter and each pass to x.dtype. Any strides are accepted; for
channels-last inputs consecutive lanes run along channels, so loads stay coalesced.

Backward: upfirdn2d is linear in x, and its adjoint is again an upfirdn2d of the output
gradient: the same filter flipped, up and down swapped, and padding
    pad0' = f_size - 1 - pad0,    pad1' = in_size * up - out_size * down + pad0
per axis (zero-insertion <-> decimation, correlation <-> convolution, pad <-> crop). The
backward calls the public op, so it is differentiable again (double backward works) and a
backward kernel that fails to compile falls back like any other call. There is no gradient
for the filter: it is a fixed buffer in StyleGAN2.
"""

import torch
import triton.language as tl

from t2f.ops.dispatch import cdiv, launch, next_power_of_2
from t2f.ops.upfirdn2d import _pair, parse_padding

TILE = 1024  # output pixels per program; each reads ceil(fh/up) * ceil(fw/up) input taps
NUM_WARPS = 4


def _upfirdn2d_kernel(
    x_ptr, f_ptr, y_ptr,
    C, H, W, OH, OW,
    sxn, sxc, sxh, sxw, syn, syc, syh, syw,
    padx0, pady0, shiftx, shifty, gain,
    tiles_x, tiles_y, tiles_c,
    UPX: tl.constexpr, UPY: tl.constexpr, DOWNX: tl.constexpr, DOWNY: tl.constexpr,
    FW: tl.constexpr, FH: tl.constexpr, SEPARABLE: tl.constexpr, FLIP: tl.constexpr,
    CHANNELS_FAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    pid = tl.program_id(0)
    tile_x = pid % tiles_x
    tile_y = (pid // tiles_x) % tiles_y
    n = pid // (tiles_x * tiles_y * tiles_c)  # one image per program, so n is a scalar
    tile_c = (pid // (tiles_x * tiles_y)) % tiles_c
    lane = tl.arange(0, BLOCK_C * BLOCK_H * BLOCK_W)
    if CHANNELS_FAST:  # channels-last memory: neighbouring lanes take neighbouring channels
        c = tile_c * BLOCK_C + lane % BLOCK_C
        ox = tile_x * BLOCK_W + (lane // BLOCK_C) % BLOCK_W
        oy = tile_y * BLOCK_H + lane // (BLOCK_C * BLOCK_W)
    else:
        # Tap loads are shifted by runtime amounts, so never aligned: one element per thread
        # (a warp reads 32 neighbours) beats 8-wide runs that split every load into 8 sweeps
        ox = tl.max_contiguous(tile_x * BLOCK_W + lane % BLOCK_W, 1)
        oy = tile_y * BLOCK_H + (lane // BLOCK_W) % BLOCK_H
        c = tile_c * BLOCK_C + lane // (BLOCK_W * BLOCK_H)
    out_mask = (ox < OW) & (oy < OH) & (c < C)
    x_base = x_ptr + n.to(tl.int64) * sxn + c.to(tl.int64) * sxc

    # first tap of the window that lands on a real (not zero-inserted) pixel, and that pixel;
    # the shifts are multiples of up that keep the remainder's operand non-negative
    ux = ox * DOWNX - padx0
    uy = oy * DOWNY - pady0
    if UPX == 1:  # every tap is real: compile-time tap indices, so filter loads are scalars
        kx0 = 0
        ix0 = ux
    else:
        kx0 = (UPX - (ux + shiftx) % UPX) % UPX
        ix0 = (ux + kx0) // UPX  # exact division
    if UPY == 1:
        ky0 = 0
        iy0 = uy
    else:
        ky0 = (UPY - (uy + shifty) % UPY) % UPY
        iy0 = (uy + ky0) // UPY

    acc = tl.full([BLOCK_C * BLOCK_H * BLOCK_W], 0.0, tl.float32)  # tl.zeros is a @jit helper
    for j in tl.static_range((FH + UPY - 1) // UPY):
        ky = ky0 + j * UPY
        iy = iy0 + j
        row_ok = out_mask & (ky < FH) & (iy >= 0) & (iy < H)
        fy = ky if FLIP else FH - 1 - ky  # flip_filter=False means true convolution
        if SEPARABLE:
            wy = tl.load(f_ptr + fy, mask=ky < FH, other=0)
        for i in tl.static_range((FW + UPX - 1) // UPX):
            kx = kx0 + i * UPX
            ix = ix0 + i
            ok = row_ok & (kx < FW) & (ix >= 0) & (ix < W)
            fx = kx if FLIP else FW - 1 - kx
            if SEPARABLE:
                w = wy * tl.load(f_ptr + fx, mask=kx < FW, other=0)
            else:
                w = tl.load(f_ptr + fy * FW + fx, mask=(ky < FH) & (kx < FW), other=0)
            v = tl.load(x_base + iy * sxh + ix * sxw, mask=ok, other=0)
            acc += v.to(tl.float32) * w
    y_offs = n.to(tl.int64) * syn + c.to(tl.int64) * syc + oy * syh + ox * syw
    tl.store(y_ptr + y_offs, (acc * gain).to(y_ptr.dtype.element_ty), mask=out_mask)


def _round_up(value: int, multiple: int) -> int:
    return cdiv(value, multiple) * multiple


def _tiles(channels, out_h, out_w, channels_fast):
    """(BLOCK_C, BLOCK_H, BLOCK_W) for a TILE-sized program, sized down for small images."""
    if channels_fast:
        block_c = min(next_power_of_2(channels), 64)
        block_w = min(next_power_of_2(out_w), TILE // block_c)
        block_h = min(next_power_of_2(out_h), TILE // (block_c * block_w))
    else:
        block_w = min(next_power_of_2(out_w), 64)
        block_h = min(next_power_of_2(out_h), TILE // block_w)
        block_c = min(next_power_of_2(channels), TILE // (block_w * block_h))
    return block_c, block_h, block_w


def output_size(in_size, up, down, pad0, pad1, f_size):
    return (in_size * up + pad0 + pad1 - f_size) // down + 1


def _forward(x, f, up, down, padding, flip_filter, gain):
    (upx, upy), (downx, downy) = up, down
    padx0, padx1, pady0, pady1 = padding
    batch, channels, height, width = x.shape
    fh, fw = (f.shape[0], f.shape[0]) if f.ndim == 1 else f.shape
    out_h = output_size(height, upy, downy, pady0, pady1, fh)
    out_w = output_size(width, upx, downx, padx0, padx1, fw)
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"upfirdn2d: padding {padding} with a {fw}x{fh} filter, up {up}, down {down} leaves no output "
            f"pixels for a {width}x{height} input"
        )
    channels_fast = x.stride(1) == 1 and channels > 1 and not x.is_contiguous()
    memory_format = torch.channels_last if channels_fast else torch.contiguous_format
    y = torch.empty((batch, channels, out_h, out_w), dtype=x.dtype, device=x.device, memory_format=memory_format)
    if y.numel() == 0:
        return y
    block_c, block_h, block_w = _tiles(channels, out_h, out_w, channels_fast)
    tiles_x, tiles_y, tiles_c = cdiv(out_w, block_w), cdiv(out_h, block_h), cdiv(channels, block_c)
    launch(
        _upfirdn2d_kernel, (batch * tiles_c * tiles_y * tiles_x,), x, f, y,
        channels, height, width, out_h, out_w, *x.stride(), *y.stride(),
        padx0, pady0, _round_up(max(padx0, 0), upx), _round_up(max(pady0, 0), upy), float(gain),
        tiles_x, tiles_y, tiles_c,
        UPX=upx, UPY=upy, DOWNX=downx, DOWNY=downy, FW=fw, FH=fh, SEPARABLE=f.ndim == 1, FLIP=bool(flip_filter),
        CHANNELS_FAST=channels_fast, BLOCK_C=block_c, BLOCK_H=block_h, BLOCK_W=block_w, num_warps=NUM_WARPS,
    )  # fmt: skip
    return y


class _UpFirDn2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, f, up, down, padding, flip_filter, gain):
        y = _forward(x, f, up, down, padding, flip_filter, gain)
        ctx.save_for_backward(f)
        ctx.params = (x.shape, y.shape, up, down, padding, flip_filter, gain)
        return y

    @staticmethod
    def backward(ctx, dy):
        from t2f.ops.upfirdn2d import upfirdn2d as upfirdn2d_public  # falls back if a kernel fails

        (f,) = ctx.saved_tensors
        x_shape, y_shape, up, down, padding, flip_filter, gain = ctx.params
        (upx, upy), (downx, downy) = up, down
        padx0, _, pady0, _ = padding
        fh, fw = (f.shape[0], f.shape[0]) if f.ndim == 1 else f.shape
        grad_padding = [
            fw - 1 - padx0,
            x_shape[3] * upx - y_shape[3] * downx + padx0,
            fh - 1 - pady0,
            x_shape[2] * upy - y_shape[2] * downy + pady0,
        ]
        dx = upfirdn2d_public(dy, f, up=down, down=up, padding=grad_padding, flip_filter=not flip_filter,
                              gain=gain, impl="triton")  # fmt: skip
        assert dx.shape == x_shape, (dx.shape, x_shape)
        return dx, None, None, None, None, None, None


def upfirdn2d(x, f, up=1, down=1, padding=0, flip_filter=False, gain=1):
    """Triton version of t2f.ops.upfirdn2d.upfirdn2d_ref (same arguments, same results)."""
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"upfirdn2d: x must be a floating-point (N, C, H, W) tensor, got {x.dtype} {tuple(x.shape)}")
    if f is None:
        f = torch.ones([1, 1], dtype=torch.float32, device=x.device)
    if f.ndim not in (1, 2) or f.dtype != torch.float32 or f.device != x.device:
        raise ValueError(
            f"upfirdn2d: f must be a float32 1-D or 2-D filter on {x.device} (see setup_filter); "
            f"got {f.dtype} {tuple(f.shape)} on {f.device}"
        )
    up, down = _pair(up), _pair(down)
    if min(up + down) < 1:
        raise ValueError(f"upfirdn2d: up and down must be >= 1, got up={up}, down={down}")
    f = f.detach().contiguous()
    return _UpFirDn2d.apply(x, f, up, down, parse_padding(padding), flip_filter, gain)
