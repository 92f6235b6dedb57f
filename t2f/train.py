"""Training entry point: `accelerate launch t2f/train.py --config PRESET [key=value ...]`.

One step (METHOD.md): caption -> frozen text encoder (or features stored in the shards) -> CA
-> mapper -> frozen synthesis -> image -> recaptioner -> L = λ1·KL + λ2·TRL for CA + mapper,
plus the recaptioner's own loss on the real pair (see t2f/models/text_to_face.py).

Runs on one CPU, DDP or DeepSpeed (through the Accelerate config). The WebDataset loader is
split by rank and worker already, so it is not passed to `accelerator.prepare`. Checkpoints
are atomic (t2f/checkpointing.py); SIGTERM/SIGUSR1 finish the step, checkpoint and exit with
REQUEUE_EXIT_CODE so a batch script can requeue; a run directory with a checkpoint resumes.
"""

import argparse
import math
import os
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script by `accelerate launch t2f/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from t2f.checkpointing import latest_checkpoint, read_state, resolve_checkpoint, save_checkpoint
from t2f.config import load_config, save_config
from t2f.monitor import Monitor, init_tracking

# "Stopped by a signal after a clean checkpoint": slurm/train.sbatch requeues the job on it. Defined
# in ./launch (T2F_REQUEUE_EXIT, sysexits' EX_TEMPFAIL); the default serves runs started without it.
REQUEUE_EXIT_CODE = int(os.environ.get("T2F_REQUEUE_EXIT", "75"))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="toy", help="preset name (toy, mmcelebahq, celebatext) or YAML path")
    parser.add_argument("--resume", default="auto", help="auto (latest if the run has one), none, latest, or a checkpoint dir")
    parser.add_argument("--cpu", action="store_true", help="force CPU even when CUDA is present (gloo for several processes)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 train.steps=100")
    return parser.parse_args(argv)


class StopRequest:
    """Remembers a SIGTERM/SIGUSR1 so the loop can finish the step and checkpoint first."""

    def __init__(self):
        self.signum = 0
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum


def make_accelerator(cfg, cpu: bool):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    handlers = []
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and (cpu or not torch.cuda.is_available()):
        # Accelerate's cpu=True switches DeepSpeed off, and without CUDA it picks no backend and
        # counts one process. DeepSpeed's own CPU accelerator runs ZeRO over gloo when asked for it.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
        cpu = False
    log_with = None if cfg.wandb.mode == "disabled" else "wandb"
    return Accelerator(cpu=cpu, mixed_precision=cfg.train.mixed_precision, gradient_accumulation_steps=cfg.train.grad_accum,
                       log_with=log_with, project_config=ProjectConfiguration(project_dir=cfg.train.run_dir),
                       kwargs_handlers=handlers)


def build_parts(cfg, device):
    """Frozen text encoder and generator, vocabulary, and the trainable TextToFace."""
    from t2f.data.loader import read_manifest
    from t2f.data.vocab import Vocab
    from t2f.models.generator import generator_from_config
    from t2f.models.text_encoder import TextEncoder
    from t2f.models.text_to_face import build_text_to_face

    vocab_path = cfg.recaptioner.vocab or str(Path(cfg.data.shards) / read_manifest(cfg.data.shards)["vocab"])
    vocab = Vocab.load(vocab_path)
    text_encoder = TextEncoder(cfg.text.encoder, cfg.text.pooling, cfg.text.max_length, cfg.text.local_files_only, device=device)
    generator = generator_from_config(cfg.generator, device=device).requires_grad_(False).eval()
    model = build_text_to_face(cfg, text_encoder.dim, generator, len(vocab)).to(device)
    return text_encoder, generator, vocab, model


def make_optimizer(cfg, model):
    """Two parameter groups: the mapper (at optim.mapper_lr_scale x the rate) and the rest."""
    o = cfg.optim
    mapper = [p for p in model.mapping.parameters() if p.requires_grad]
    ids = {id(p) for p in mapper}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]  # the frozen ResNet stays out
    groups = [{"params": rest, "lr_scale": 1.0},
              {"params": mapper, "lr_scale": o.mapper_lr_scale, "lr": o.lr * o.mapper_lr_scale}]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    raise ValueError(f"optim.name must be 'sgd' or 'adamw', got {o.name!r}")


def set_learning_rate(cfg, optimizer, step: int) -> None:
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(cfg, step) * group["lr_scale"]


def learning_rate(cfg, step: int) -> float:
    """Linear warm-up to optim.lr, then constant; a function of the step, so resume needs no state."""
    warmup = cfg.optim.warmup_steps
    return cfg.optim.lr * min(1.0, (step + 1) / warmup) if warmup > 0 else cfg.optim.lr


def train_batches(cfg, vocab, accelerator, epoch: int, skip: int):
    """Endless (epoch, index, batch) stream; each epoch reshuffles; `skip` batches of the first are dropped."""
    from t2f.data.loader import make_train_loader

    d = cfg.data
    while True:
        loader = make_train_loader(d.shards, d.train_split, batch_size=d.batch_size, resolution=d.resolution, vocab=vocab,
                                   rank=accelerator.process_index, world_size=accelerator.num_processes,
                                   num_workers=d.num_workers, seed=cfg.train.seed, epoch=epoch, resampled=d.resampled,
                                   shuffle_buffer=d.shuffle_buffer, max_tokens=d.max_caption_tokens)
        for index, batch in enumerate(loader):
            if index >= skip:
                yield epoch, index, batch
        epoch, skip = epoch + 1, 0


def text_features(cfg, batch, text_encoder, device):
    if cfg.data.use_precomputed_text and "text_features" in batch:
        return batch["text_features"].to(device, torch.float32)
    return text_encoder.encode(batch["caption"]).to(device, torch.float32)


def resume_state(args, cfg, accelerator) -> dict:
    """Load the checkpoint named by --resume into the prepared objects; returns the loop state."""
    fresh = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "skipped_steps": 0}
    if args.resume == "none":
        return fresh
    if args.resume in ("auto", "latest"):
        ckpt = latest_checkpoint(cfg.train.run_dir)
        if ckpt is None:
            if args.resume == "latest":
                raise SystemExit(f"--resume latest: {cfg.train.run_dir} has no checkpoint yet")
            return fresh
    else:
        ckpt = resolve_checkpoint(args.resume)
    accelerator.load_state(str(ckpt))
    state = {**fresh, **read_state(ckpt)}
    accelerator.print(f"[t2f] resumed from {ckpt} at step {state['step']}")
    return state


def agree(accelerator, *flags: float) -> list[bool]:
    """Flags raised on any rank count on every rank (so all ranks skip or stop together)."""
    local = torch.tensor(flags, dtype=torch.float32, device=accelerator.device)
    return [bool(v > 0) for v in accelerator.reduce(local, reduction="sum").tolist()]


def write_samples(cfg, accelerator, monitor, step, model, generator, text_encoder, vocab, captions):
    from t2f.visual import caption_grid

    per = cfg.train.samples_per_caption
    net = accelerator.unwrap_model(model)
    with torch.no_grad():
        s = text_encoder.encode(captions).float().repeat_interleave(per, 0)  # (N*per, S)
        ws, *_ = net.latents(s, generator=torch.Generator(s.device).manual_seed(cfg.train.seed))
        images = generator.synthesis(ws.float(), noise_mode="const", force_fp32=s.device.type != "cuda")
        decoded = [vocab.decode(ids) for ids in net.recaptioner.greedy(images, max_len=cfg.data.max_caption_tokens)]
    grid = caption_grid(images.cpu(), captions, per_row=per, subcaptions=decoded)
    monitor.log_samples(step, grid, captions, decoded)


def periodic_eval(cfg, accelerator, monitor, step, model, generator, text_encoder, vocab, hooks):
    """`t2f eval`'s code on `eval.subset` test images; every rank takes part, rank 0 logs `eval/`."""
    from t2f.eval.evaluate import evaluate
    from t2f.inference import Pipeline

    pipeline = Pipeline.from_parts(cfg, accelerator.unwrap_model(model), generator, text_encoder, vocab)
    out = Path(cfg.train.run_dir) / "eval" / f"step-{step:08d}.json"
    was_training = model.training
    model.eval()
    try:
        return evaluate(pipeline, max_images=cfg.eval.subset, step=step, out_path=out, hooks=hooks, skip_missing=True,
                        log_fn=lambda scalars, s: monitor.log(s, scalars, prefix=""), progress=False)
    finally:
        model.train(was_training)


def sample_captions(cfg, vocab, count: int) -> list[str]:
    from t2f.data.loader import make_eval_loader

    loader = make_eval_loader(cfg.data.shards, cfg.data.eval_split, batch_size=count, resolution=cfg.data.resolution, vocab=vocab)
    return list(next(iter(loader))["caption"])[:count]


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(cfg.train.run_dir)
    accelerator = make_accelerator(cfg, cpu=args.cpu)
    from accelerate.utils import set_seed

    set_seed(cfg.train.seed, device_specific=True)  # CA noise and dropout differ per rank
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    device = accelerator.device
    text_encoder, generator, vocab, model = build_parts(cfg, device)
    optimizer = make_optimizer(cfg, model)
    _configure_deepspeed(accelerator, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = resume_state(args, cfg, accelerator)
    wandb_on = init_tracking(accelerator, cfg, run_dir) not in ("disabled",)
    monitor = Monitor(accelerator, run_dir, cfg.train.steps, state["step"], wandb_on)
    captions = sample_captions(cfg, vocab, cfg.train.sample_captions) if cfg.train.sample_every else []
    stop = StopRequest()
    eval_hooks = None
    if cfg.train.eval_every:
        from t2f.eval.hooks import EvalHooks

        eval_hooks = EvalHooks()  # filled on first use: Inception/LPIPS load once per run
    force_fp32 = device.type != "cuda"  # fp16 synthesis layers only where fp16 is fast
    bad_in_row, tic, seen = 0, time.perf_counter(), 0

    def checkpoint():
        save_checkpoint(accelerator, run_dir, state["step"], model, cfg, vocab, dict(state), cfg.train.keep_last)

    stream = train_batches(cfg, vocab, accelerator, state["epoch"], state["batch_in_epoch"])
    while state["step"] < cfg.train.steps:
        epoch, index, batch = next(stream)
        joint = state["step"] >= cfg.train.recaptioner_warmup_steps
        with accelerator.accumulate(model):
            s = text_features(cfg, batch, text_encoder, device)
            with accelerator.autocast():
                loss, logs = model(s, batch["tokens"].to(device), batch["image"].to(device), generator.synthesis,
                                   cfg.loss, joint=joint, force_fp32=force_fp32)
            bad, stopping = agree(accelerator, float(not torch.isfinite(loss)), float(stop.signum != 0))
            if not bad:
                accelerator.backward(loss)
                grad_norm = _clip(accelerator, model, cfg)
                set_learning_rate(cfg, optimizer, state["step"])
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        state.update(epoch=epoch, batch_in_epoch=index + 1)
        seen += batch["image"].shape[0]
        if not accelerator.sync_gradients:
            continue
        if bad:
            state["skipped_steps"] += 1
            bad_in_row += 1
            monitor.log(state["step"], {"skipped_steps": state["skipped_steps"]})
            if bad_in_row >= cfg.train.max_bad_steps:
                raise RuntimeError(f"{bad_in_row} non-finite losses in a row at step {state['step']}: see "
                                   f"{run_dir / 'metrics.jsonl'}; lower optim.lr, check the data, or train.mixed_precision=no")
            continue
        bad_in_row = 0
        state["step"] += 1
        step = state["step"]
        monitor.step(step, {"loss": loss.item(), **{k: float(v) for k, v in logs.items()}})
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            elapsed, tic = time.perf_counter() - tic, time.perf_counter()
            scalars = {"loss": loss.detach(), **logs, "lr": learning_rate(cfg, step - 1), "grad_norm": grad_norm,
                       "samples_per_s": seen / elapsed, "epoch": epoch}
            if torch.cuda.is_available():
                scalars["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            monitor.log(step, {k: float(v) for k, v in scalars.items()})
            seen = 0
        if cfg.train.sample_every and (step % cfg.train.sample_every == 0 or step == cfg.train.steps):
            if accelerator.is_main_process:
                write_samples(cfg, accelerator, monitor, step, model, generator, text_encoder, vocab, captions)
        if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or step == cfg.train.steps):
            periodic_eval(cfg, accelerator, monitor, step, model, generator, text_encoder, vocab, eval_hooks)
        if step % cfg.train.ckpt_every == 0 or step == cfg.train.steps or stopping:
            checkpoint()
        if stopping:
            accelerator.print(f"[t2f] signal {stop.signum}: checkpoint at step {step} written; exiting for requeue")
            return _finish(accelerator, monitor, REQUEUE_EXIT_CODE)
    return _finish(accelerator, monitor, 0)


def _clip(accelerator, model, cfg):
    if cfg.optim.grad_clip > 0 and accelerator.sync_gradients:
        norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        return float(norm) if norm is not None else math.nan
    return math.nan


def _configure_deepspeed(accelerator, cfg):
    """Fill DeepSpeed's "auto" values Accelerate cannot infer (no DataLoader is prepared) from our config."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
        if plugin.deepspeed_config.get("gradient_clipping") == "auto":
            plugin.deepspeed_config["gradient_clipping"] = cfg.optim.grad_clip


def _finish(accelerator, monitor, code: int) -> int:
    monitor.close()
    accelerator.wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # gloo sometimes aborts at exit otherwise
    return code


if __name__ == "__main__":
    sys.exit(main())
