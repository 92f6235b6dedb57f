"""Up-sample, FIR-filter, down-sample: StyleGAN2's anti-aliased resampling.

`upfirdn2d` inserts `up - 1` zeros between pixels, pads (negative padding crops), convolves
with the 2-D FIR filter `f` and keeps every `down`-th pixel. Semantics follow NVlabs so
official weights produce the same images: by default the filter is flipped (true
convolution), `flip_filter=True` gives correlation, and `gain` scales the filter (applied
once per filter dimension for separable filters).
"""

import torch
import torch.nn.functional as F

from t2f.ops.dispatch import KernelUnavailable, choose_impl, disable_triton


def _pair(value):
    if isinstance(value, int):
        return value, value
    assert len(value) == 2, value
    return int(value[0]), int(value[1])


def parse_padding(padding):
    """int | (x, y) | (x0, x1, y0, y1) -> (padx0, padx1, pady0, pady1)."""
    if isinstance(padding, int):
        return padding, padding, padding, padding
    if len(padding) == 2:
        px, py = padding
        return px, px, py, py
    assert len(padding) == 4, padding
    return tuple(int(p) for p in padding)


def filter_size(f):
    """(width, height) of a 1-D (separable) or 2-D filter; (1, 1) for None."""
    if f is None:
        return 1, 1
    assert f.ndim in (1, 2), f.shape
    return (f.shape[-1], f.shape[0])


def setup_filter(f, device="cpu", normalize=True, flip_filter=False, gain=1, separable=None):
    """Make a float32 filter tensor from a list: 1-D for separable use, 2-D otherwise."""
    if f is None:
        f = 1
    f = torch.as_tensor(f, dtype=torch.float32)
    assert f.ndim in (0, 1, 2) and f.numel() > 0
    if f.ndim == 0:
        f = f[None]
    if separable is None:
        separable = f.ndim == 1 and f.numel() >= 8
    if f.ndim == 1 and not separable:
        f = f.ger(f)
    assert f.ndim == (1 if separable else 2)
    if normalize:
        f /= f.sum()
    if flip_filter:
        f = f.flip(list(range(f.ndim)))
    f = f * (gain ** (f.ndim / 2))
    return f.to(device=device)


def upfirdn2d_ref(x, f, up=1, down=1, padding=0, flip_filter=False, gain=1):
    """Reference implementation: zero-insertion, pad/crop, depthwise conv, decimation."""
    assert x.ndim == 4, x.shape
    if f is None:
        f = torch.ones([1, 1], dtype=torch.float32, device=x.device)
    assert f.ndim in (1, 2) and f.dtype == torch.float32
    batch, channels, height, width = x.shape
    upx, upy = _pair(up)
    downx, downy = _pair(down)
    padx0, padx1, pady0, pady1 = parse_padding(padding)

    x = x.reshape(batch, channels, height, 1, width, 1)  # zero insertion
    x = F.pad(x, [0, upx - 1, 0, 0, 0, upy - 1])
    x = x.reshape(batch, channels, height * upy, width * upx)

    x = F.pad(x, [max(padx0, 0), max(padx1, 0), max(pady0, 0), max(pady1, 0)])
    x = x[:, :, max(-pady0, 0) : x.shape[2] - max(-pady1, 0), max(-padx0, 0) : x.shape[3] - max(-padx1, 0)]

    f = (f * (gain ** (f.ndim / 2))).to(x.dtype)
    if not flip_filter:
        f = f.flip(list(range(f.ndim)))
    f = f[None, None].repeat([channels, 1] + [1] * f.ndim)  # depthwise weights
    if f.ndim == 4:
        x = F.conv2d(x, f, groups=channels)
    else:  # separable: rows, then columns
        x = F.conv2d(x, f.unsqueeze(2), groups=channels)
        x = F.conv2d(x, f.unsqueeze(3), groups=channels)
    return x[:, :, ::downy, ::downx]


def upfirdn2d(x, f, up=1, down=1, padding=0, flip_filter=False, gain=1, impl="auto"):
    """Pad, up-sample, filter and down-sample a batch of images `x` (N, C, H, W)."""
    if choose_impl("upfirdn2d", impl, x) == "triton":
        try:
            from t2f.ops import triton_upfirdn2d

            return triton_upfirdn2d.upfirdn2d(x, f, up, down, padding, flip_filter, gain)
        except (ImportError, KernelUnavailable) as error:  # Triton cannot run here; see dispatch.py
            disable_triton("upfirdn2d", error)
    return upfirdn2d_ref(x, f, up, down, padding, flip_filter, gain)


def filter2d(x, f, padding=0, flip_filter=False, gain=1, impl="auto"):
    """Filter with `f`, keeping the image size (padding added to centre the filter)."""
    padx0, padx1, pady0, pady1 = parse_padding(padding)
    fw, fh = filter_size(f)
    p = [padx0 + fw // 2, padx1 + (fw - 1) // 2, pady0 + fh // 2, pady1 + (fh - 1) // 2]
    return upfirdn2d(x, f, padding=p, flip_filter=flip_filter, gain=gain, impl=impl)


def upsample2d(x, f, up=2, padding=0, flip_filter=False, gain=1, impl="auto"):
    """Up-sample by `up` with anti-aliasing filter `f` (gain compensates the inserted zeros)."""
    upx, upy = _pair(up)
    padx0, padx1, pady0, pady1 = parse_padding(padding)
    fw, fh = filter_size(f)
    p = [
        padx0 + (fw + upx - 1) // 2,
        padx1 + (fw - upx) // 2,
        pady0 + (fh + upy - 1) // 2,
        pady1 + (fh - upy) // 2,
    ]
    return upfirdn2d(x, f, up=up, padding=p, flip_filter=flip_filter, gain=gain * upx * upy, impl=impl)


def downsample2d(x, f, down=2, padding=0, flip_filter=False, gain=1, impl="auto"):
    """Down-sample by `down` after low-pass filtering with `f`."""
    downx, downy = _pair(down)
    padx0, padx1, pady0, pady1 = parse_padding(padding)
    fw, fh = filter_size(f)
    p = [
        padx0 + (fw - downx + 1) // 2,
        padx1 + (fw - downx) // 2,
        pady0 + (fh - downy + 1) // 2,
        pady1 + (fh - downy) // 2,
    ]
    return upfirdn2d(x, f, down=down, padding=p, flip_filter=flip_filter, gain=gain, impl=impl)
