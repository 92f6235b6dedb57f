"""`t2f bench ops`: fused Triton ops vs the PyTorch reference at the FFHQ-1024 generator's shapes.

    t2f bench ops                          # batch 8, fp16, every layer shape of the 1024² generator
    t2f bench ops --batch 4 --resolution 256 --dtype fp32

For every distinct (op, shape) the synthesis network runs, the reference (`impl='ref'`) and the
fused kernel are timed in the same process, forward and forward+backward (gradient to the
input only, as for the frozen generator), and their ratio is printed. A summary weights each
shape by how often one generator pass runs it and compares the totals to the targets
(bias_act >= 3x, upfirdn2d >= 1.5x forward+backward). The table is Markdown, ready for
docs/BENCHMARKS.md. Timing: CUDA events around each call, warm-up calls first (they include
Triton's compilation), median of `--repeats`. An eager call of a small layer is bound by the host's
launch work, not the GPU; `--cuda-graphs` replays each call from a CUDA graph instead, which leaves
the kernels' own time (what the fusion saves when the host runs ahead of the GPU).
"""

import argparse
import statistics
import sys

import torch

from t2f.ops import dispatch

TARGETS = {"bias_act": 3.0, "upfirdn2d": 1.5}  # fused / reference speed-up, forward+backward
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def cuda_median_ms(fn, warmup: int = 3, repeats: int = 20) -> float:
    """Median wall time of `fn()` on the current CUDA stream, in milliseconds."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def cuda_graph_median_ms(fn, warmup: int = 3, repeats: int = 20) -> float:
    """Median time of `fn()` replayed from a CUDA graph: its kernels, without the host's launch work."""
    side = torch.cuda.Stream()  # warm-up (Triton's compilation, autograd's buffers) off the capture
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(warmup, 1)):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return cuda_median_ms(graph.replay, warmup, repeats)


def environment_line() -> str:
    import triton

    name = torch.cuda.get_device_name()
    return f"GPU: {name}; torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton.__version__}"


def no_gpu(command: str) -> int:
    print(f"{command}: no CUDA GPU present; this benchmark times GPU kernels, so there is nothing to measure here.")
    return 0


def generator_layers(resolution: int, batch: int, channel_base: int = 32768, channel_max: int = 512):
    """[(op, kwargs label, input shape, count per generator pass)] for a StyleGAN2 config-f generator."""
    layers = []
    for res in [2**i for i in range(2, resolution.bit_length())]:
        channels = min(channel_base // res, channel_max)
        convs = 1 if res == 4 else 2
        layers.append(("bias_act", "lrelu, clamp 256", (batch, channels, res, res), convs))
        layers.append(("bias_act", "linear, clamp 256 (toRGB)", (batch, 3, res, res), 1))
        if res > 4:  # conv0's filter after the stride-2 transposed conv, and the image skip
            layers.append(("upfirdn2d", "4x4 filter, pad 1", (batch, channels, res + 1, res + 1), 1))
            layers.append(("upfirdn2d", "upsample2d x2", (batch, 3, res // 2, res // 2), 1))
    return layers


def _op_pair(op: str, label: str, channels: int, device):
    """(reference, fused) callables x -> y for one layer kind."""
    from t2f.ops import triton_bias_act, triton_upfirdn2d
    from t2f.ops.bias_act import bias_act_ref
    from t2f.ops.upfirdn2d import setup_filter, upfirdn2d_ref, upsample2d

    if op == "bias_act":
        act = "lrelu" if label.startswith("lrelu") else "linear"
        b = torch.randn(channels, device=device)
        return (lambda x: bias_act_ref(x, b, act=act, clamp=256),
                lambda x: triton_bias_act.bias_act(x, b, act=act, clamp=256))  # fmt: skip
    f = setup_filter([1, 3, 3, 1], device=device)
    if label.startswith("upsample2d"):
        return (lambda x: upsample2d(x, f, impl="ref"),
                lambda x: upsample2d(x, f, impl="triton"))  # fmt: skip
    return (lambda x: upfirdn2d_ref(x, f, padding=1, gain=4),
            lambda x: triton_upfirdn2d.upfirdn2d(x, f, padding=1, gain=4))  # fmt: skip


def time_layer(fn, x, warmup, repeats, graphs=False):
    """(forward ms, forward+backward ms) of fn at input x; `graphs`: replayed from a CUDA graph."""
    timer = cuda_graph_median_ms if graphs else cuda_median_ms
    with torch.no_grad():
        y = fn(x)
        fwd = timer(lambda: fn(x), warmup, repeats)
    xg = x.detach().requires_grad_(True)
    dy = torch.randn_like(y)
    both = timer(lambda: torch.autograd.grad(fn(xg), xg, dy), warmup, repeats)
    return fwd, both


def report(args, device) -> None:
    """Print the per-layer table and the per-op summary (Markdown)."""
    dtype = DTYPES[args.dtype]
    print("| op | layer | input shape | per pass | fwd ref ms | fwd fused ms | fwd x "
          "| f+b ref ms | f+b fused ms | f+b x |\n" + "|---" * 10 + "|")  # fmt: skip
    totals = {}  # op -> [ref fwd, fused fwd, ref f+b, fused f+b], weighted by count per pass
    for op, label, shape, count in generator_layers(args.resolution, args.batch, args.channel_base, args.channel_max):
        x = torch.randn(shape, device=device, dtype=dtype)
        ref_fn, fused_fn = _op_pair(op, label, shape[1], device)
        ref_fwd, ref_both = time_layer(ref_fn, x, args.warmup, args.repeats, args.cuda_graphs)
        fused_fwd, fused_both = time_layer(fused_fn, x, args.warmup, args.repeats, args.cuda_graphs)
        row = totals.setdefault(op, [0.0] * 4)
        for i, value in enumerate((ref_fwd, fused_fwd, ref_both, fused_both)):
            row[i] += count * value
        dims = "x".join(map(str, shape))
        print(f"| {op} | {label} | {dims} | {count} | {ref_fwd:.3f} | {fused_fwd:.3f} | {ref_fwd / fused_fwd:.2f} "
              f"| {ref_both:.3f} | {fused_both:.3f} | {ref_both / fused_both:.2f} |")  # fmt: skip
        del x

    print("\n| op, one generator pass | fwd ref ms | fwd fused ms | fwd x | f+b ref ms | f+b fused ms | f+b x "
          "| target f+b |\n" + "|---" * 8 + "|")  # fmt: skip
    for op, (ref_fwd, fused_fwd, ref_both, fused_both) in totals.items():
        ratio = ref_both / fused_both
        verdict = "met" if ratio >= TARGETS[op] else "NOT met"
        print(f"| {op} | {ref_fwd:.2f} | {fused_fwd:.2f} | {ref_fwd / fused_fwd:.2f} | {ref_both:.2f} "
              f"| {fused_both:.2f} | {ratio:.2f} | >= {TARGETS[op]} ({verdict}) |")  # fmt: skip
    if dispatch._disabled:  # a kernel failed to compile: the fused upsample2d rows ran the reference
        print(f"\nWARNING: Triton was disabled in this process ({dispatch._disabled}); some fused rows are not fused.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="t2f bench ops", description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=1024, help="generator output size (a power of two)")
    parser.add_argument("--channel-base", type=int, default=32768, help="channels at res r: min(base / r, max)")
    parser.add_argument("--channel-max", type=int, default=512)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay each call from a CUDA graph: the kernels' time without the host's launch work")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        return no_gpu("t2f bench ops")
    timing = "CUDA graph replay (kernel time)" if args.cuda_graphs else "eager calls (host launch included)"
    print(f"{environment_line()}; batch {args.batch}, {args.dtype}, median of {args.repeats}, {timing}\n")
    report(args, torch.device("cuda"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
