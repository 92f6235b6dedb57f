"""Fused ops in context: synthesis parity, compiling for a real GPU, the benchmark commands.

Compiling every kernel variant for sm_90 needs no GPU (Triton and ptxas run on the CPU) and
catches what the interpreter cannot: code the Triton compiler rejects. The benchmarks cannot
time anything without CUDA, but their table-building code runs here on CPU tensors with a
stand-in timer, and the layer shapes they time are checked against the network's real calls.
"""

import pytest
import torch
from test_ops import _grads

from t2f.models import benchmark as generator_benchmark
from t2f.models import synthesis
from t2f.ops import benchmark as ops_benchmark
from t2f.ops import triton_bias_act, triton_upfirdn2d
from t2f.ops.bias_act import ACTIVATIONS
from t2f.ops.upfirdn2d import setup_filter, upsample2d

# ---------------------------------------------------------------- the synthesis network


def test_tiny_synthesis_network_triton_matches_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("T2F_OPS", raising=False)
    torch.manual_seed(0)
    net = synthesis.SynthesisNetwork(w_dim=8, img_resolution=16, img_channels=3, channel_base=64, channel_max=8,
                           num_fp16_res=0, conv_clamp=1.0, impl="ref")  # fmt: skip
    with torch.no_grad():  # non-zero biases and noise strengths, so every op path matters
        for param in net.parameters():
            param.add_(0.2 * torch.randn_like(param))
    ws = torch.randn(2, net.num_ws, 8)
    dimg = torch.randn(2, 3, 16, 16)

    def image_and_grad(impl):
        img, (dws,) = _grads(lambda ws: synthesis.set_impl(net, impl)(ws), [ws], dimg)
        return img, dws

    img_ref, dws_ref = image_and_grad("ref")
    img, dws = image_and_grad("triton")
    torch.testing.assert_close(img, img_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dws, dws_ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- compiling for a real GPU


def _compile_for_sm90(fn, args, meta):
    """Compile a captured launch for an H100/H200 (sm_90) on the CPU, specialising like the JIT."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = triton.jit(fn)
    constexprs, num_warps = dict(meta), meta["num_warps"]
    del constexprs["num_warps"]
    signature, attrs = {}, {}
    for index, (name, value) in enumerate(zip(kernel.arg_names, args)):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + str(value.dtype).replace("torch.float", "fp").replace("torch.bfloat16", "bf16")
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            constexprs[name] = 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    signature = {name: "constexpr" if name in constexprs else signature[name] for name in kernel.arg_names}
    target = GPUTarget("cuda", 90, 32)
    options = triton.compiler.make_backend(target).parse_options({"num_warps": num_warps})
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def test_every_kernel_variant_compiles_for_sm90(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets impl='triton' accept CPU tensors; nothing runs
    monkeypatch.delenv("T2F_OPS", raising=False)
    launches = []
    capture = lambda fn, grid, *args, **meta: launches.append((fn, args, meta))  # noqa: E731
    monkeypatch.setattr(triton_bias_act, "launch", capture)
    monkeypatch.setattr(triton_upfirdn2d, "launch", capture)
    half = dict(dtype=torch.float16)
    for act in sorted(ACTIVATIONS):
        x = torch.zeros(8, 64, 16, 16, **half)
        _grads(lambda x, act=act: triton_bias_act.bias_act(x, torch.zeros(64), act=act, clamp=256), [x], x)
    x = torch.zeros(8, 64, 16, 16, **half).to(memory_format=torch.channels_last)
    triton_bias_act.bias_act(x, torch.zeros(64, **half), act="lrelu")
    f, f1 = setup_filter([1, 3, 3, 1]), setup_filter([1, 3, 3, 1], separable=True)
    x = torch.zeros(8, 64, 33, 33, **half)
    _grads(lambda x: triton_upfirdn2d.upfirdn2d(x, f, padding=1, gain=4), [x], torch.zeros(8, 64, 32, 32))
    _grads(lambda x: upsample2d(x, f, impl="triton"), [x], torch.zeros(8, 64, 66, 66))  # + its down=2 grad
    triton_upfirdn2d.upfirdn2d(x.to(memory_format=torch.channels_last), f1, up=2, padding=2)
    triton_upfirdn2d.upfirdn2d(x, f1, down=2, padding=1, flip_filter=True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for fn, args, meta in launches:
        assert "cubin" in _compile_for_sm90(fn, args, meta).asm, (fn.__name__, meta)
    assert len(launches) == 2 * len(ACTIVATIONS) + 1 + 6  # bias_act fwd+bwd per act, 6 upfirdn2d


# ---------------------------------------------------------------- benchmarks


@pytest.mark.parametrize("module", [ops_benchmark, generator_benchmark])
def test_benchmarks_without_gpu_say_so_and_succeed(module, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert module.main([]) == 0
    assert "no CUDA GPU present" in capsys.readouterr().out


def test_benchmarked_layer_shapes_are_the_ones_the_generator_runs(monkeypatch):
    calls = {}  # (op, input shape) -> count

    def recorder(op, real):
        def record(x, *args, **kwargs):
            key = (op, tuple(x.shape))
            calls[key] = calls.get(key, 0) + 1
            return real(x, *args, **kwargs)

        return record

    for name in ("bias_act", "upfirdn2d", "upsample2d"):
        monkeypatch.setattr(synthesis, name, recorder(name, getattr(synthesis, name)))
    net = synthesis.SynthesisNetwork(8, 32, 3, channel_base=256, channel_max=16, impl="ref")
    with torch.no_grad():
        net(torch.zeros(2, net.num_ws, 8))
    expected = {}
    for op, label, shape, count in ops_benchmark.generator_layers(32, 2, channel_base=256, channel_max=16):
        key = ("upsample2d" if label.startswith("upsample2d") else op, shape)
        expected[key] = expected.get(key, 0) + count
    assert calls == expected


def _stand_in_timer(fn, warmup, repeats):
    fn()
    return 1.0


def test_ops_benchmark_report_runs(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(ops_benchmark, "cuda_median_ms", _stand_in_timer)
    args = ops_benchmark.argparse.Namespace(batch=1, resolution=8, channel_base=64, channel_max=8, dtype="fp32",
                                            warmup=0, repeats=1, cuda_graphs=False)  # fmt: skip
    ops_benchmark.report(args, torch.device("cpu"))
    out = capsys.readouterr().out
    assert "| bias_act | lrelu, clamp 256 | 1x8x8x8 | 2 |" in out
    # summary rows add each layer's time (1 ms here) times its calls per generator pass
    assert "| bias_act | 5.00 |" in out and "| upfirdn2d | 2.00 |" in out


def test_generator_benchmark_report_runs(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(generator_benchmark, "cuda_median_ms", _stand_in_timer)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 0)
    args = generator_benchmark.argparse.Namespace(batch=1, resolution=8, channel_base=64, channel_max=8, warmup=0,
                                                  repeats=1)  # fmt: skip
    generator_benchmark.report(args, torch.device("cpu"))
    out = capsys.readouterr().out
    assert "| fp16 fused (triton) | 1.0 | 1000.0 |" in out and "target >= 1.3" in out
