"""`t2f bench train --memory`: the GPU memory a config's training step needs, computed on the CPU.

    t2f bench train --config mmcelebahq --memory          # the paper preset at its batch (12)

Computed, not measured (on a GPU `t2f bench train` measures the peak itself):
- parameters, gradients and optimiser state from the models' sizes, in fp32 as the trainer holds
  them: the trainable CA head, mapper and recaptioner (weights, gradients, SGD momentum or AdamW's
  two moments, the EMA of the text path), the frozen generator, image encoder and text encoder;
- activations: the real step's forward (TextToFace + TrainingLoss) runs on the CPU in the GPU's
  dtypes (synthesis blocks in fp16 where CUDA would use it, the rest under bf16 autocast), and
  every tensor autograd keeps for the backward pass is counted once (saved_tensors_hooks), per part
  of the step, at two small batches; from batch 2 on every saved tensor grows with the batch, so
  the per-sample cost extrapolates linearly to the target batch;
- the backward's transient: three times the largest saved tensor (the gradient buffers of the
  largest layer while its backward runs).
The synthesis runs the reference ops here; the fused Triton kernels keep fewer intermediates, so
its figure is an upper bound. Not counted: the CUDA context (about 0.5 GiB more in nvidia-smi)
and the caching allocator's slack.
"""

import torch

GIB = 2**30
PHASES = ("recaptioner, real image", "CA head + mapper", "synthesis", "recaptioner, generated face")


def saved_for_backward(cfg, model, generator, batch) -> tuple[dict, int]:
    """({phase: bytes autograd keeps}, largest single tensor) of one training forward on `batch`."""
    from t2f.trainer.loss import TrainingLoss

    owned = {t.untyped_storage().data_ptr() for m in (model, generator, model.recaptioner.encoder.body)
             for t in (*m.parameters(), *m.buffers())}  # weights are counted as parameters, not here
    phase, seen, found, largest = [PHASES[0]], set(), dict.fromkeys(PHASES, 0), [0]

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in owned and ptr not in seen:
            seen.add(ptr)
            found[phase[0]] += t.untyped_storage().nbytes()
            largest[0] = max(largest[0], t.untyped_storage().nbytes())
        return t

    hooks = [model.ca.register_forward_pre_hook(lambda *_: phase.__setitem__(0, PHASES[1])),
             generator.synthesis.register_forward_pre_hook(lambda *_: phase.__setitem__(0, PHASES[2])),
             generator.synthesis.register_forward_hook(lambda *_: phase.__setitem__(0, PHASES[3]))]
    text, tokens, images = batch
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            TrainingLoss(cfg.loss)(model, text, tokens, images)
    finally:
        for hook in hooks:
            hook.remove()
    return found, largest[0]


def static_bytes(cfg, model, generator) -> dict:
    """{what: bytes} of the weights and optimiser state the step holds on the GPU (fp32)."""
    def size(tensors):
        return sum(t.numel() * 4 for t in tensors)

    trainable = size(p for p in model.parameters() if p.requires_grad)
    moments = 2 if cfg.optim.name == "adamw" else 1
    parts = {"trainable weights (CA head, mapper, recaptioner)": trainable, "their gradients": trainable,
             f"{cfg.optim.name} state": moments * trainable,
             "frozen generator (weights, noise buffers)": size((*generator.parameters(), *generator.buffers())),
             "frozen image encoder": size((*model.recaptioner.encoder.body.parameters(),
                                           *model.recaptioner.encoder.body.buffers()))}
    if cfg.train.ema_decay > 0:
        parts["EMA of CA head + mapper"] = size((*model.ca.parameters(), *model.mapping.parameters()))
    parts["frozen text encoder"] = _text_encoder_bytes(cfg)
    return parts


def _text_encoder_bytes(cfg) -> int:
    from t2f.models.text_encoder import TextEncoder, TextEncoderError

    try:
        encoder = TextEncoder(cfg.text.encoder, cfg.text.pooling, cfg.text.max_length, local_files_only=True)
    except (TextEncoderError, OSError, ValueError):
        print(f"(text encoder {cfg.text.encoder} not on disk: counted as CLIP ViT-B/32's text tower, 63.4 M parameters)")
        return 63_428_096 * 4
    return sum(p.numel() * 4 for p in encoder.model.parameters())


def report(cfg, model, generator, target: int, probes=(2, 3), vocab_size=30000, text_dim=512) -> None:
    """Print the estimate for batch `target` as Markdown, with the measured activations at `probes`."""
    from t2f.trainer.benchmark import synthetic_batch

    generator.synthesis.fp16_on_cpu = True  # the dtypes a GPU step uses
    measured = {b: saved_for_backward(cfg, model, generator, synthetic_batch(cfg, b, vocab_size, text_dim, "cpu"))
                for b in probes}
    (b0, (s0, l0)), (b1, (s1, l1)) = measured.items()
    print(f"| activations kept for backward | batch {b0} GiB | batch {b1} GiB | per sample GiB | batch {target} GiB |")
    print("|---|---:|---:|---:|---:|")
    total = 0.0
    for name in PHASES:
        slope = (s1[name] - s0[name]) / (b1 - b0)
        at_target = s0[name] + slope * (target - b0)
        total += at_target
        print(f"| {name} | {s0[name] / GIB:.3f} | {s1[name] / GIB:.3f} | {slope / GIB:.3f} | {at_target / GIB:.2f} |")
    transient = 3 * (l0 + (l1 - l0) / (b1 - b0) * (target - b0))
    static = static_bytes(cfg, model, generator)
    print(f"\n| batch {target}, one GPU | GiB |\n|---|---:|")
    for name, nbytes in static.items():
        print(f"| {name} | {nbytes / GIB:.2f} |")
    grand_total = (sum(static.values()) + total + transient) / GIB
    print(f"| activations kept for backward (above) | {total / GIB:.2f} |\n"
          f"| backward transient (3 x largest saved tensor) | {transient / GIB:.2f} |\n"
          f"| **total (compare with torch.cuda.max_memory_allocated)** | **{grand_total:.1f}** |")
