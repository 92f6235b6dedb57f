"""`t2f bench train`: training samples/s and peak memory of one process, for a config.

Times the real training step (TextToFace forward with every loss, backward, optimiser step) on
synthetic batches of the config's shapes, with the frozen generator in two modes measured in
the same run: fp16 layers + fused Triton ops (what training uses on a GPU) and fp32 + the
PyTorch reference ops. The generator's weights are random (speed does not depend on them), and
so are the recaptioner's ResNet-101 weights when the file is not on disk, so no checkpoint,
weights or data are needed:

    t2f bench train --config mmcelebahq                       # 1024² generator
    t2f bench train --config mmcelebahq generator.resolution=256
    t2f bench train --config mmcelebahq --memory              # GPU memory at batch 12, computed on the CPU
"""

import argparse
import dataclasses
import functools
import time

import torch

from t2f.config import load_config


def _parser():
    parser = argparse.ArgumentParser(prog="t2f bench train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="mmcelebahq")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode (after 3 warm-up steps)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: data.batch_size of the config")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="without a GPU, time only the fp32 reference mode on the CPU "
                             "(checks the code path; not a benchmark)")
    parser.add_argument("--memory", action="store_true",
                        help="compute the GPU memory the step needs at --batch-size, on the CPU (t2f/trainer/memory.py)")
    parser.add_argument("--vocab-size", type=int, default=30000, help="recaptioner vocabulary (METHOD.md: S = 30 000)")
    parser.add_argument("overrides", nargs="*")
    return parser


def synthetic_batch(cfg, batch_size, vocab_size, text_dim, device):
    """Random images in [-1, 1], token ids and text features with the config's shapes."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, vocab_size, (batch_size, cfg.data.max_caption_tokens), generator=g)
    tokens[:, 0], tokens[:, -1] = 1, 2  # <bos> ... <eos>
    images = torch.rand(batch_size, 3, cfg.data.resolution, cfg.data.resolution, generator=g) * 2 - 1
    text = torch.randn(batch_size, text_dim, generator=g)
    return text.to(device), tokens.to(device), images.to(device)


def time_mode(cfg, impl, fp16, batch, steps, device):
    """(samples/s, peak GiB) of the train step with the generator in one precision/ops mode."""
    from t2f.models.generator import generator_from_config
    from t2f.trainer.loss import TrainingLoss
    from t2f.trainer.optim import make_optimizer

    generator = generator_from_config(cfg.generator, device=device).requires_grad_(False).eval()
    generator.set_impl(impl)
    text, tokens, images = batch
    model = build_model(cfg, text.shape[1], generator, vocab_size=int(tokens.max()) + 1).to(device)
    model.use_synthesis(functools.partial(generator.synthesis, force_fp32=not fp16), cfg.generator.noise_mode)
    optimizer, loss_fn = make_optimizer(cfg, model), TrainingLoss(cfg.loss)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss, _ = loss_fn(model, text, tokens, images)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    elapsed = time.perf_counter() - start
    return steps * text.shape[0] / elapsed, (torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"))


def build_model(cfg, text_dim, generator, vocab_size):
    """The TextToFace of `cfg`; random recaptioner weights of the real shapes when the file is missing.

    Speed does not depend on the weights, so a benchmark on a machine without the ImageNet
    ResNet-101 file still measures the real step, and says so.
    """
    from t2f.models.text_to_face import build_text_to_face

    try:
        return build_text_to_face(cfg, text_dim, generator, vocab_size)
    except FileNotFoundError as err:
        print(f"t2f bench train: {str(err).splitlines()[0]} -> timing with random weights of the same shapes")
        random_cfg = dataclasses.replace(cfg, recaptioner=dataclasses.replace(cfg.recaptioner, encoder_weights="random"))
        return build_text_to_face(random_cfg, text_dim, generator, vocab_size)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.memory:
        return memory_report(args)
    gpu = torch.cuda.is_available()
    if not gpu and not args.cpu_smoke:
        print("t2f bench train: no CUDA GPU is present; this benchmark measures GPU training throughput. Nothing to do.")
        return 0
    cfg = load_config(args.config, list(args.overrides) + ["generator.checkpoint="])
    batch_size = args.batch_size or cfg.data.batch_size
    device = torch.device("cuda" if gpu else "cpu")
    batch = synthetic_batch(cfg, batch_size, vocab_size=args.vocab_size, text_dim=512, device=device)
    rows = [("fp16 + fused (Triton)", *time_mode(cfg, "triton", True, batch, args.steps, device))] if gpu else []
    rows.append(("fp32 + reference", *time_mode(cfg, "ref", False, batch, args.steps, device)))
    where = torch.cuda.get_device_name() if gpu else "CPU (smoke check, not a benchmark)"
    print(f"config {args.config} | generator {cfg.generator.resolution}² | batch {batch_size} | {where} "
          f"| torch {torch.__version__}")
    print(format_rows(rows))
    return 0


def memory_report(args) -> int:
    """`--memory`: the estimate of t2f/trainer/memory.py for the config at --batch-size (its batch by default)."""
    from t2f.models.generator import generator_from_config
    from t2f.trainer import memory

    cfg = load_config(args.config, list(args.overrides) + ["generator.checkpoint="])
    generator = generator_from_config(cfg.generator).requires_grad_(False).eval()
    model = build_model(cfg, 512, generator, args.vocab_size)
    target = args.batch_size or cfg.data.batch_size
    print(f"config {args.config} | generator {cfg.generator.resolution}² | recaptioner {cfg.recaptioner.encoder} at "
          f"{cfg.recaptioner.input_size}² | vocabulary {args.vocab_size} | computed on the CPU | torch {torch.__version__}\n")
    memory.report(cfg, model, generator, target, vocab_size=args.vocab_size)
    return 0


def format_rows(rows) -> str:
    """The table `main` prints (`./launch gpu-check` reads it): one line per (mode, samples/s, peak GiB)."""
    lines = [f"{'generator mode':<24}{'samples/s':>12}{'peak GiB':>10}"]
    lines += [f"{name:<24}{rate:>12.2f}{peak:>10.2f}" for name, rate, peak in rows]
    if len(rows) == 2:
        lines.append(f"speed-up fp16+fused / fp32+ref: {rows[0][1] / rows[1][1]:.2f}x; "
                     f"memory ratio {rows[0][2] / rows[1][2]:.2f}")
    return "\n".join(lines)
