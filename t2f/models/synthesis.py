"""StyleGAN2 config-f synthesis network: ws (B, num_ws, w_dim) -> image (B, C, H, W).

One block per resolution 4, 8, ..., img_resolution (`b4`, `b8`, ...): a learned constant (b4) or
an up-sampling modulated conv (`conv0`), a modulated conv (`conv1`) and a toRGB layer whose
outputs are summed over resolutions (skip architecture). Semantics, parameter layout and
state-dict names follow NVlabs' stylegan2-ada-pytorch, so official weights load key for key.

Every bias/activation and FIR filtering op goes through `t2f.ops` with `impl=self.impl`, so the
fused Triton kernels drop in without touching this file.

Precision: blocks in the top `num_fp16_res` resolutions compute in fp16 with activations clamped
to +-conv_clamp (NVlabs' mixed precision); parameters stay fp32. Like NVlabs' stylegan3 code, fp16
is used only for CUDA tensors: on CPU those blocks run in fp32 (CPU half kernels are slow and the
CPU path serves tests and the toy world) unless `fp16_on_cpu` is set, which the tests do to
exercise the fp16 path.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from t2f.models.mapping import FullyConnectedLayer
from t2f.ops import bias_act, setup_filter, upfirdn2d, upsample2d

NOISE_MODES = ("const", "random", "none")


def conv2d_resample(x, w, f=None, up=1, padding=0, groups=1, flip_weight=True, impl="auto"):
    """Up-sample `x` by `up` with FIR filter `f`, then convolve with `w` (O, I/groups, k, k).

    Semantics: `upfirdn2d(x, f, up, gain=up^2)` followed by a correlation with `w` (a true
    convolution when `flip_weight=False`). For up > 1 it runs a transposed convolution on the
    small grid and filters afterwards: the same linear map with up^2 fewer multiply-adds.
    """
    if up == 1:
        return F.conv2d(x, w if flip_weight else w.flip([2, 3]), padding=padding, groups=groups)
    out_channels, in_per_group, kh, kw = w.shape
    fw, fh = f.shape[-1], f.shape[0]
    pads = [padding + (fw + up - 1) // 2, padding + (fw - up) // 2, padding + (fh + up - 1) // 2, padding + (fh - up) // 2]
    # A transposed conv already emits k-1 extra border pixels; the filter's padding shrinks by that.
    post = [pads[0] - (kw - 1), pads[1] - (kw - up), pads[2] - (kh - 1), pads[3] - (kh - up)]
    if min(post) < 0:  # kernels too large for the fast path: use the definition directly
        x = upfirdn2d(x, f, up=up, padding=pads, gain=up**2, impl=impl)
        return F.conv2d(x, w if flip_weight else w.flip([2, 3]), groups=groups)
    # conv_transpose2d wants (in, out/groups, k, k) and performs a true convolution.
    wt = w.reshape(groups, out_channels // groups, in_per_group, kh, kw).transpose(1, 2)
    wt = wt.reshape(groups * in_per_group, out_channels // groups, kh, kw)
    if flip_weight:
        wt = wt.flip([2, 3])
    x = F.conv_transpose2d(x, wt, stride=up, groups=groups)  # (B, O, (H-1)*up+k, ...)
    return upfirdn2d(x, f, padding=post, gain=up**2, impl=impl)


def modulated_conv2d(x, weight, styles, noise=None, up=1, padding=0, resample_filter=None, demodulate=True,
                     flip_weight=True, fused_modconv=True, impl="auto"):
    """Conv whose input channels are scaled per sample by `styles` (B, I), outputs demodulated.

    fused_modconv=True folds the styles into per-sample weights and runs one grouped conv;
    False scales activations instead (better for fp16 and large batches). Same result.
    """
    batch = x.shape[0]
    out_channels, in_channels, kh, kw = weight.shape
    assert styles.shape == (batch, in_channels), (tuple(styles.shape), batch, in_channels)
    if x.dtype == torch.float16 and demodulate:
        # Pre-scale so fp16 products cannot overflow; demodulation cancels these factors exactly.
        weight = weight * (1 / np.sqrt(in_channels * kh * kw) / weight.norm(float("inf"), dim=[1, 2, 3], keepdim=True))
        styles = styles / styles.norm(float("inf"), dim=1, keepdim=True)

    w = dcoefs = None
    if demodulate or fused_modconv:
        w = weight.unsqueeze(0) * styles.reshape(batch, 1, -1, 1, 1)  # (B, O, I, k, k)
    if demodulate:
        dcoefs = (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()  # (B, O)
    conv = dict(f=resample_filter, up=up, padding=padding, flip_weight=flip_weight, impl=impl)

    if fused_modconv:
        if demodulate:
            w = w * dcoefs.reshape(batch, -1, 1, 1, 1)
        x = x.reshape(1, -1, *x.shape[2:])  # (1, B*I, H, W): one group per sample
        x = conv2d_resample(x, w.reshape(-1, in_channels, kh, kw).to(x.dtype), groups=batch, **conv)
        x = x.reshape(batch, -1, *x.shape[2:])  # (B, O, H', W')
        # In place: the sum is formed in fp32 and rounded once, exactly as NVlabs does in fp16.
        return x.add_(noise) if noise is not None else x

    x = x * styles.to(x.dtype).reshape(batch, -1, 1, 1)
    x = conv2d_resample(x, weight.to(x.dtype), **conv)
    if demodulate and noise is not None:
        return torch.addcmul(noise.to(x.dtype), x, dcoefs.to(x.dtype).reshape(batch, -1, 1, 1))  # one rounding
    if demodulate:
        return x * dcoefs.to(x.dtype).reshape(batch, -1, 1, 1)
    return x.add_(noise.to(x.dtype)) if noise is not None else x


def set_impl(module: nn.Module, impl: str) -> nn.Module:
    """Choose the fused-op implementation ('auto' | 'ref' | 'triton') for every layer in `module`."""
    for child in module.modules():
        if hasattr(child, "impl"):
            child.impl = impl
    return module


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (optionally up-sampling x2) + noise + bias + leaky ReLU + clamp."""

    def __init__(self, in_channels, out_channels, w_dim, resolution, kernel_size=3, up=1, use_noise=True,
                 resample_filter=(1, 3, 3, 1), conv_clamp=None, impl="auto"):
        super().__init__()
        self.in_channels, self.out_channels, self.resolution = in_channels, out_channels, resolution
        self.up, self.use_noise, self.conv_clamp, self.impl = up, use_noise, conv_clamp, impl
        self.padding = kernel_size // 2
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.register_buffer("resample_filter", setup_filter(list(resample_filter)))
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        if use_noise:
            self.register_buffer("noise_const", torch.randn([resolution, resolution]))
            self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))

    def forward(self, x, w, noise_mode="const", fused_modconv=True):
        assert noise_mode in NOISE_MODES, f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}"
        styles = self.affine(w)  # (B, I)
        noise = None
        if self.use_noise and noise_mode == "random":
            noise = torch.randn([x.shape[0], 1, self.resolution, self.resolution], device=x.device) * self.noise_strength
        elif self.use_noise and noise_mode == "const":
            noise = self.noise_const * self.noise_strength  # (H, W), broadcast over batch and channels
        # NVlabs convolves (not correlates) in the up-sampling layers; weights depend on it.
        x = modulated_conv2d(x, self.weight, styles, noise=noise, up=self.up, padding=self.padding,
                             resample_filter=self.resample_filter, flip_weight=(self.up == 1),
                             fused_modconv=fused_modconv, impl=self.impl)
        return bias_act(x, self.bias.to(x.dtype), act="lrelu", clamp=self.conv_clamp, impl=self.impl)


class ToRGBLayer(nn.Module):
    """Modulated 1x1 conv to image channels, no demodulation."""

    def __init__(self, in_channels, out_channels, w_dim, kernel_size=1, conv_clamp=None, impl="auto"):
        super().__init__()
        self.conv_clamp, self.impl = conv_clamp, impl
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / np.sqrt(in_channels * kernel_size**2)

    def forward(self, x, w, fused_modconv=True):
        styles = self.affine(w) * self.weight_gain  # (B, I)
        x = modulated_conv2d(x, self.weight, styles, demodulate=False, fused_modconv=fused_modconv, impl=self.impl)
        return bias_act(x, self.bias.to(x.dtype), clamp=self.conv_clamp, impl=self.impl)


class SynthesisBlock(nn.Module):
    """One resolution: (const | conv0 up x2) -> conv1 -> toRGB added to the up-sampled image."""

    def __init__(self, in_channels, out_channels, w_dim, resolution, img_channels, use_fp16=False,
                 conv_clamp=256, resample_filter=(1, 3, 3, 1), impl="auto"):
        super().__init__()
        self.in_channels, self.resolution, self.use_fp16, self.impl = in_channels, resolution, use_fp16, impl
        self.register_buffer("resample_filter", setup_filter(list(resample_filter)))
        layer = dict(w_dim=w_dim, resolution=resolution, conv_clamp=conv_clamp, impl=impl)
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, up=2, resample_filter=resample_filter, **layer)
        self.conv1 = SynthesisLayer(out_channels, out_channels, **layer)
        self.torgb = ToRGBLayer(out_channels, img_channels, w_dim, conv_clamp=conv_clamp, impl=impl)
        self.num_conv = 1 if in_channels == 0 else 2
        self.num_torgb = 1

    def compute_dtype(self, ws, force_fp32=False, fp16_on_cpu=False):
        fp16 = self.use_fp16 and not force_fp32 and (ws.is_cuda or fp16_on_cpu)
        return torch.float16 if fp16 else torch.float32

    def forward(self, x, img, ws, noise_mode="const", force_fp32=False, fp16_on_cpu=False, fused_modconv=None):
        dtype = self.compute_dtype(ws, force_fp32, fp16_on_cpu)
        if fused_modconv is None:  # NVlabs' rule: grouped conv for fp32 inference (or batch 1)
            fused_modconv = not self.training and (dtype == torch.float32 or ws.shape[0] == 1)
        w_iter = iter(ws.unbind(dim=1))
        layer = dict(noise_mode=noise_mode, fused_modconv=fused_modconv)
        if self.in_channels == 0:
            x = self.const.to(dtype).unsqueeze(0).repeat([ws.shape[0], 1, 1, 1])  # (B, C, 4, 4)
        else:
            x = self.conv0(x.to(dtype), next(w_iter), **layer)  # (B, C, 2H, 2W)
        x = self.conv1(x, next(w_iter), **layer)
        if img is not None:
            img = upsample2d(img, self.resample_filter, impl=self.impl)  # (B, img_channels, 2H, 2W)
        y = self.torgb(x, next(w_iter), fused_modconv=fused_modconv).to(torch.float32)
        img = y if img is None else img + y
        return x, img


class SynthesisNetwork(nn.Module):
    """ws (B, num_ws, w_dim) -> float32 image (B, img_channels, R, R), roughly in [-1, 1]."""

    def __init__(self, w_dim, img_resolution, img_channels, channel_base=32768, channel_max=512, num_fp16_res=4,
                 conv_clamp=256, impl="auto"):
        super().__init__()
        log2 = int(np.log2(img_resolution))
        if img_resolution < 4 or 2**log2 != img_resolution:
            raise ValueError(f"img_resolution must be a power of two >= 4, got {img_resolution}")
        self.w_dim, self.img_resolution, self.img_channels = w_dim, img_resolution, img_channels
        self.channel_base, self.channel_max, self.impl = channel_base, channel_max, impl
        self.block_resolutions = [2**i for i in range(2, log2 + 1)]
        self.channels = {res: min(channel_base // res, channel_max) for res in self.block_resolutions}
        self.fp16_on_cpu = False  # see the module docstring
        self.num_ws = 0
        for res in self.block_resolutions:
            in_channels = self.channels[res // 2] if res > 4 else 0
            block = SynthesisBlock(in_channels, self.channels[res], w_dim, res, img_channels, impl=impl)
            self.num_ws += block.num_conv
            setattr(self, f"b{res}", block)
        self.num_ws += 1  # the last block's toRGB; earlier toRGBs share the next block's first w
        self.set_precision(num_fp16_res, conv_clamp)

    def set_precision(self, num_fp16_res, conv_clamp):
        """fp16 for the top `num_fp16_res` resolutions; clamp every conv output to +-conv_clamp."""
        self.num_fp16_res, self.conv_clamp = num_fp16_res, conv_clamp
        fp16_resolution = max(2 ** (int(np.log2(self.img_resolution)) + 1 - num_fp16_res), 8)
        for res in self.block_resolutions:
            getattr(self, f"b{res}").use_fp16 = res >= fp16_resolution
        for module in self.modules():
            if isinstance(module, (SynthesisLayer, ToRGBLayer)):
                module.conv_clamp = conv_clamp

    def forward(self, ws, noise_mode="const", force_fp32=False, fused_modconv=None):
        assert ws.ndim == 3 and ws.shape[1:] == (self.num_ws, self.w_dim), (tuple(ws.shape), self.num_ws, self.w_dim)
        ws = ws.to(torch.float32)
        x = img = None
        w_idx = 0
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            block_ws = ws.narrow(1, w_idx, block.num_conv + block.num_torgb)  # (B, n, w_dim)
            x, img = block(x, img, block_ws, noise_mode=noise_mode, force_fp32=force_fp32,
                           fp16_on_cpu=self.fp16_on_cpu, fused_modconv=fused_modconv)
            w_idx += block.num_conv
        return img

    def extra_repr(self):
        widths = ", ".join(f"{r}:{c}" for r, c in self.channels.items())
        return f"w_dim={self.w_dim}, num_ws={self.num_ws}, img_resolution={self.img_resolution}, channels={{{widths}}}"
