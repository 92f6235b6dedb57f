"""Hot ops of the StyleGAN2 synthesis network: one public API, a pure-PyTorch reference and
fused Triton kernels behind `impl='auto'|'ref'|'triton'` (see dispatch.py)."""

from t2f.ops.bias_act import bias_act
from t2f.ops.upfirdn2d import downsample2d, filter2d, setup_filter, upfirdn2d, upsample2d

__all__ = ["bias_act", "upfirdn2d", "setup_filter", "upsample2d", "downsample2d", "filter2d"]
