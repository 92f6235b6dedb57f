"""`t2f bench generator`: images/s of the frozen synthesis network, forward and backward to w.

    t2f bench generator                    # FFHQ-1024 config-f, batch 8
    t2f bench generator --resolution 256 --batch 16

This is the generator's job in training: ws -> image forward, then the gradient of the image
loss back to ws (the generator's own weights are frozen). Three settings run in one process on
the same randomly initialised weights (speed does not depend on their values):
fp16 with the fused Triton ops, fp16 with the PyTorch reference ops, and fp32 with the
reference ops. fp16 means NVlabs' mixed precision: the top four resolutions in fp16 with
activations clamped to +-256. The target is fp16 fused >= 1.3x fp16 reference. Timing: CUDA
events, warm-up passes first (they include Triton's compilation), median of `--repeats`.
"""

import argparse
import sys

import torch

from t2f.models.synthesis import SynthesisNetwork, set_impl
from t2f.ops import dispatch
from t2f.ops.benchmark import cuda_median_ms, environment_line, no_gpu

SETTINGS = [  # (label, impl, force_fp32)
    ("fp16 fused (triton)", "triton", False),
    ("fp16 reference", "ref", False),
    ("fp32 reference", "ref", True),
]
TARGET = 1.3  # fp16 fused / fp16 reference, forward+backward


def build_generator(resolution: int, device, channel_base: int = 32768, channel_max: int = 512):
    """A frozen StyleGAN2 config-f synthesis network (random weights), as training holds it."""
    net = SynthesisNetwork(w_dim=512, img_resolution=resolution, img_channels=3, channel_base=channel_base,
                           channel_max=channel_max, num_fp16_res=4, conv_clamp=256, impl="ref")  # fmt: skip
    return net.requires_grad_(False).eval().to(device)


def time_setting(net, ws, impl, force_fp32, warmup, repeats):
    """(forward ms, forward+backward-to-ws ms, peak GiB) for one setting."""
    set_impl(net, impl)
    with torch.no_grad():
        img = net(ws, force_fp32=force_fp32)
        fwd = cuda_median_ms(lambda: net(ws, force_fp32=force_fp32), warmup, repeats)
    wsg = ws.detach().requires_grad_(True)
    dimg = torch.randn_like(img)
    torch.cuda.reset_peak_memory_stats()
    both = cuda_median_ms(lambda: torch.autograd.grad(net(wsg, force_fp32=force_fp32), wsg, dimg), warmup, repeats)
    return fwd, both, torch.cuda.max_memory_allocated() / 2**30


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="t2f bench generator", description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=1024, help="generator output size (a power of two)")
    parser.add_argument("--channel-base", type=int, default=32768, help="channels at res r: min(base / r, max)")
    parser.add_argument("--channel-max", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        return no_gpu("t2f bench generator")
    print(f"{environment_line()}; synthesis {args.resolution}², batch {args.batch}, median of {args.repeats}\n")
    report(args, torch.device("cuda"))
    return 0


def report(args, device) -> None:
    """Time every setting and print the table (Markdown) and the verdict."""
    net = build_generator(args.resolution, device, args.channel_base, args.channel_max)
    ws = torch.randn(args.batch, net.num_ws, net.w_dim, device=device)
    print("| setting | fwd ms | fwd images/s | fwd+bwd ms | fwd+bwd images/s | peak GiB | vs fp16 reference |")
    print("|---|---|---|---|---|---|---|")
    results = {label: time_setting(net, ws, impl, fp32, args.warmup, args.repeats) for label, impl, fp32 in SETTINGS}
    ref_both = results["fp16 reference"][1]
    for label, (fwd, both, peak) in results.items():
        print(f"| {label} | {fwd:.1f} | {args.batch / fwd * 1e3:.1f} | {both:.1f} | {args.batch / both * 1e3:.1f} "
              f"| {peak:.2f} | {ref_both / both:.2f}x |")  # fmt: skip
    if dispatch._disabled:  # a kernel failed to compile: the "fused" row ran the reference
        print(f"\nWARNING: Triton was disabled in this process ({dispatch._disabled}); the fused row is not fused.")
    ratio = ref_both / results["fp16 fused (triton)"][1]
    print(f"\nfp16 fused / fp16 reference, forward+backward: {ratio:.2f}x (target >= {TARGET}: "
          f"{'met' if ratio >= TARGET else 'NOT met'})")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
