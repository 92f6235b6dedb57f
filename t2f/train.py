"""Training entry point: `accelerate launch t2f/train.py --config PRESET [key=value ...]`.

One step (METHOD.md): caption -> frozen text encoder (or features stored in the shards) -> CA
-> mapper -> frozen synthesis -> image -> recaptioner -> L = λ1·KL + λ2·TRL for CA + mapper,
plus the recaptioner's own loss on the real pair (t2f/trainer/loss.py).

Runs on one CPU, DDP or DeepSpeed (through the Accelerate config). The WebDataset loader is
split by rank and worker already, so it is not passed to `accelerator.prepare`; it is built once
and re-seeded each epoch. Checkpoints are atomic (t2f/checkpointing.py); SIGTERM/SIGUSR1 finish
the step, checkpoint and exit with REQUEUE_EXIT_CODE so a batch script can requeue; a run
directory with a checkpoint resumes. Bad input (config, shards, weights) is one line on stderr
and exit 2, before the run directory is touched.
"""

import argparse
import contextlib
import datetime
import math
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script by `accelerate launch t2f/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from t2f.exit_status import StopRequest, install_early_stop_request, take_early_stop_request

# As the trainer script, the stop handler goes in before the slow imports below (torch, accelerate:
# seconds on a busy node), so a SIGUSR1/SIGTERM during them is kept for the loop (t2f/exit_status.py).
if __name__ == "__main__":
    install_early_stop_request()

import torch

from t2f.checkpointing import (
    CheckpointWriteError,
    RunDirError,
    hold_run_dir,
    latest_checkpoint,
    read_state,
    refuse_fresh_start,
    resolve_checkpoint,
    save_checkpoint,
)
from t2f.config import ConfigError, load_config, save_config
from t2f.data.faults import DataAccounting, DataFaultError
from t2f.exit_status import BAD_INPUT, requeue_status
from t2f.monitor import Monitor, init_tracking
from t2f.trainer.ema import make_ema
from t2f.trainer.optim import is_joint, learning_rate, make_optimizer, set_learning_rate
from t2f.trainer.sampling import eval_hooks, generation_pipeline, periodic_eval, sample_captions, write_samples

# "Stopped by a signal after a clean checkpoint" (slurm/train.sbatch requeues the job on it) and
# "bad input": t2f/exit_status.py carries both past `accelerate launch` to ./launch.
REQUEUE_EXIT_CODE = requeue_status()
BAD_INPUT_EXIT_CODE = BAD_INPUT


class BadInput(Exception):
    """Something the user gave (config, shards, weights) cannot be used; the message says what."""


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="toy", help="preset name (toy, mmcelebahq, celebatext) or YAML path")
    parser.add_argument("--resume", default="auto", help="auto (latest if the run has one), none, latest, or a checkpoint dir")
    parser.add_argument("--cpu", action="store_true", help="force CPU even when CUDA is present (gloo for several processes)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 train.steps=100")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------- start-up


def check_data(cfg) -> dict:
    """The shards' manifest, once it is known to hold what this config trains on."""
    from t2f.data.manifest import read_manifest

    try:
        manifest = read_manifest(cfg.data.shards, remote_options(cfg))
    except (OSError, ValueError) as err:
        raise BadInput(f"data.shards: {err}") from None
    if not 0 <= cfg.data.max_bad_fraction <= 1:
        raise BadInput(f"data.max_bad_fraction must be between 0 and 1, got {cfg.data.max_bad_fraction}")
    if not cfg.train.dist_timeout_s >= 0:  # NaN too
        raise BadInput(f"train.dist_timeout_s must be 0 (the backend's default) or a number of seconds, "
                       f"got {cfg.train.dist_timeout_s}")
    splits = manifest.get("splits", {})
    needed = [cfg.data.train_split] + ([cfg.data.eval_split] if cfg.train.sample_every or cfg.train.eval_every else [])
    for split in needed:
        if not splits.get(split, {}).get("count"):
            raise BadInput(f"{cfg.data.shards}: split {split!r} has no samples (splits: {', '.join(splits) or 'none'}); "
                           "rebuild the shards or set data.train_split / data.eval_split")
    return manifest


def make_accelerator(cfg, cpu: bool):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    group = {}  # how the process group starts (InitProcessGroupKwargs); Accelerate's defaults otherwise
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and (cpu or not torch.cuda.is_available()):
        # Accelerate's cpu=True switches DeepSpeed off, and without CUDA it picks no backend and
        # counts one process. DeepSpeed's own CPU accelerator runs ZeRO over gloo when asked for it.
        group["backend"] = "gloo"
        cpu = False
    if cfg.train.dist_timeout_s:
        group["timeout"] = datetime.timedelta(seconds=cfg.train.dist_timeout_s)
    handlers = [InitProcessGroupKwargs(**group)] if group else []
    log_with = None if cfg.wandb.mode == "disabled" else "wandb"
    return Accelerator(cpu=cpu, mixed_precision=cfg.train.mixed_precision, gradient_accumulation_steps=cfg.train.grad_accum,
                       log_with=log_with, project_config=ProjectConfiguration(project_dir=cfg.train.run_dir),
                       kwargs_handlers=handlers)


def build_parts(cfg, device):
    """Frozen text encoder and generator, vocabulary, and the trainable TextToFace."""
    from t2f.data.manifest import check_text_features, read_manifest
    from t2f.data.remote import location_of
    from t2f.data.vocab import Vocab
    from t2f.inference import build_models
    from t2f.models.text_encoder import TextEncoderError
    from t2f.models.weights import CheckpointError

    try:
        manifest = read_manifest(cfg.data.shards, remote_options(cfg))
        vocab = Vocab.load(cfg.recaptioner.vocab or location_of(cfg.data.shards, manifest["vocab"]))
        text_encoder, generator, model = build_models(cfg, len(vocab), device)
        # stored features must be what text.* would compute, or training and sampling disagree
        check_text_features(manifest, cfg.text, cfg.data.use_precomputed_text, encoder=text_encoder)
    except (OSError, ValueError, CheckpointError, TextEncoderError) as err:
        raise BadInput(str(err)) from None
    return text_encoder, generator, vocab, model


@contextlib.contextmanager
def run_directory(cfg, args, accelerator):
    """The run directory, created only now that config, data and weights checked out, and held by
    this trainer (RUN/t2f.lock, t2f/checkpointing.py: hold_run_dir) until the run ends."""
    run_dir = Path(cfg.train.run_dir)

    def prepare():  # main process, holding the lock; a refusal or a write error stops every rank
        if args.resume == "none":
            refuse_fresh_start(run_dir)  # never start a second run over a run's checkpoints
        save_config(cfg, run_dir / "config.yaml")

    with hold_run_dir(accelerator, run_dir, prepare):
        yield run_dir


def bad_input(err) -> int:
    if os.environ.get("RANK", "0") == "0":  # every rank meets the same error: say it once
        print(f"t2f train: {' '.join(str(err).split())}", file=sys.stderr)
    return BAD_INPUT_EXIT_CODE


# ---------------------------------------------------------------------------- the loop's helpers


def remote_options(cfg):
    """Retries and time-out for shards at a URL (ignored for a local folder)."""
    from t2f.data.remote import RemoteOptions

    return RemoteOptions(retries=cfg.data.remote_retries, timeout=cfg.data.remote_timeout)


def make_loader(cfg, vocab, accelerator):
    from t2f.data.loader import make_train_loader

    d = cfg.data
    return make_train_loader(d.shards, d.train_split, batch_size=d.batch_size, resolution=d.resolution, vocab=vocab,
                             rank=accelerator.process_index, world_size=accelerator.num_processes,
                             num_workers=d.num_workers, seed=cfg.train.seed, resampled=d.resampled,
                             shuffle_buffer=d.shuffle_buffer, max_tokens=d.max_caption_tokens, remote=remote_options(cfg))


def train_batches(loader, epoch: int, skip: int):
    """Endless (epoch, index, batch) stream over one loader; `skip` batches of the first epoch are dropped."""
    while True:
        loader.set_epoch(epoch)  # reshuffles shards, buffer and caption choice
        for index, batch in enumerate(loader):
            if index >= skip:
                yield epoch, index, batch
        epoch, skip = epoch + 1, 0


def text_features(cfg, batch, text_encoder, device):
    if cfg.data.use_precomputed_text and "text_features" in batch:
        return batch["text_features"].to(device, torch.float32)
    return text_encoder.encode(batch["caption"]).to(device, torch.float32)


def resume_state(args, cfg, accelerator) -> tuple[dict, Path | None]:
    """Load the checkpoint named by --resume into the prepared objects; returns the loop state and it."""
    fresh = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "skipped_steps": 0}
    if args.resume == "none":
        return fresh, None
    if args.resume in ("auto", "latest"):
        ckpt = latest_checkpoint(cfg.train.run_dir)
        if ckpt is None:
            if args.resume == "latest":
                raise BadInput(f"--resume latest: {cfg.train.run_dir} has no checkpoint yet")
            return fresh, None
    else:
        ckpt = resolve_checkpoint(args.resume)
    accelerator.load_state(str(ckpt))
    state = {**fresh, **read_state(ckpt)}
    accelerator.print(f"[t2f] resumed from {ckpt} at step {state['step']}")
    return state, ckpt


def agree(accelerator, *flags: float) -> list[bool]:
    """Flags raised on any rank count on every rank (so all ranks skip or stop together)."""
    local = torch.tensor(flags, dtype=torch.float32, device=accelerator.device)
    return [bool(v > 0) for v in accelerator.reduce(local, reduction="sum").tolist()]


# ---------------------------------------------------------------------------- main


def main(argv=None) -> int:
    stop = take_early_stop_request() or StopRequest()  # first: a preemption signal during start-up must not be lost
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check_data(cfg)
    except (ConfigError, BadInput) as err:
        return bad_input(err)
    accelerator = make_accelerator(cfg, cpu=args.cpu)
    from accelerate.utils import set_seed

    set_seed(cfg.train.seed, device_specific=True)  # CA noise and dropout differ per rank
    try:
        parts = build_parts(cfg, accelerator.device)
        with run_directory(cfg, args, accelerator) as run_dir:
            return train(cfg, args, accelerator, run_dir, parts, stop)
    except (BadInput, RunDirError) as err:
        return bad_input(err)
    except DataFaultError as err:  # every rank says it: each names its own bad shards
        print(f"t2f train: {err}", file=sys.stderr)
        return BAD_INPUT_EXIT_CODE
    except RuntimeError as err:
        if not is_peer_timeout(err):
            raise
        # One line instead of a gloo traceback (tqdm.write: on a line of its own, not after the progress
        # bar); a failure status, so torchrun ends the other ranks and Slurm can requeue the job.
        from tqdm import tqdm

        tqdm.write(f"t2f train: rank {accelerator.process_index}: another rank did not answer within "
                   f"{peer_timeout_s(cfg)} (stuck, or the link between nodes down); the run stops here and resumes "
                   "from its last checkpoint when started again", file=sys.stderr)
        return 1


def is_peer_timeout(err: RuntimeError) -> bool:
    """A collective gave up waiting for another rank. Gloo says "Timed out waiting ...ms for recv ..." in
    the collective that waited, or "Application timeout caused pair closure" in the next one."""
    text = str(err).lower()
    return torch.distributed.is_initialized() and ("timed out" in text or "timeout" in text)


def peer_timeout_s(cfg) -> str:
    seconds = cfg.train.dist_timeout_s
    return f"train.dist_timeout_s={seconds:g} s" if seconds else "the backend's default time-out (train.dist_timeout_s=0)"


def train(cfg, args, accelerator, run_dir, parts, stop) -> int:
    from t2f.trainer.loss import TrainingLoss

    text_encoder, generator, vocab, model = parts
    optimizer = make_optimizer(cfg, model)
    _configure_deepspeed(accelerator, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    state, resumed_from = resume_state(args, cfg, accelerator)
    ema = make_ema(cfg, accelerator.unwrap_model(model), resumed_from)
    wandb_on = init_tracking(accelerator, cfg, run_dir) not in ("disabled",)
    monitor = Monitor(accelerator, run_dir, cfg.train.steps, state["step"], wandb_on)
    captions = sample_captions(cfg, vocab, cfg.train.sample_captions) if cfg.train.sample_every else []
    hooks = eval_hooks(cfg)
    loss_fn, device = TrainingLoss(cfg.loss), accelerator.device
    bad_in_row, tic, seen, grad_norm = 0, time.perf_counter(), 0, math.nan
    accounting = DataAccounting(cfg.data.max_bad_fraction)  # corrupt/lost samples of every worker and epoch

    def checkpoint():
        from t2f.inference import EMA_WEIGHTS

        extra = {EMA_WEIGHTS: ema.state_dict()} if ema is not None else None
        save_checkpoint(accelerator, run_dir, state["step"], model, cfg, vocab, dict(state), cfg.train.keep_last,
                        extra_weights=extra)

    batches = train_batches(make_loader(cfg, vocab, accelerator), state["epoch"], state["batch_in_epoch"])
    while state["step"] < cfg.train.steps:
        epoch, index, batch = next(batches)
        accounting.update(batch, check=False)  # the ranks agree below, so they stop together
        set_learning_rate(cfg, optimizer, state["step"])  # before backward: DeepSpeed steps inside it
        with accelerator.accumulate(model):
            s = text_features(cfg, batch, text_encoder, device)
            with accelerator.autocast():
                loss, logs = loss_fn(model, s, batch["tokens"].to(device), batch["image"].to(device),
                                     joint=is_joint(cfg, state["step"]))
            bad, stopping, data_fault = agree(accelerator, float(not torch.isfinite(loss)), float(stop.signum != 0),
                                              float(accounting.exceeded()))
            if data_fault:
                raise accounting.error()
            if not bad:
                accelerator.backward(loss)
                grad_norm = _clip(accelerator, model, cfg)
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
        if ema is not None:
            ema.update(accelerator.unwrap_model(model))
        state["step"] += 1
        step = state["step"]
        monitor.step(step)
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            elapsed, tic = time.perf_counter() - tic, time.perf_counter()
            scalars = {"loss": loss.detach(), **logs, "lr": learning_rate(cfg, step - 1), "grad_norm": grad_norm,
                       "samples_per_s": seen / elapsed, "epoch": epoch}
            faults = accounting.totals()  # each rank counts its own shards: log the sum
            scalars.update(zip(faults, accelerator.reduce(torch.tensor(list(faults.values()), device=device), "sum")))
            if torch.cuda.is_available():
                scalars["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            monitor.log(step, {k: float(v) for k, v in scalars.items()})  # the only GPU sync of a step
            seen = 0
        sample_now = cfg.train.sample_every and (step % cfg.train.sample_every == 0 or step == cfg.train.steps)
        eval_now = cfg.train.eval_every and (step % cfg.train.eval_every == 0 or step == cfg.train.steps)
        if sample_now or eval_now:
            with generation_pipeline(cfg, accelerator, model, ema, generator, text_encoder, vocab) as pipeline:
                if sample_now and accelerator.is_main_process:
                    write_samples(cfg, monitor, step, pipeline, captions)
                if eval_now:
                    periodic_eval(cfg, monitor, step, pipeline, hooks)
        if step % cfg.train.ckpt_every == 0 or step == cfg.train.steps or stopping:
            try:
                checkpoint()
            except CheckpointWriteError as err:  # every rank gets it: all stop here, with one line
                code = _finish(accelerator, monitor, 1)  # closes the progress bar first
                if accelerator.is_main_process:
                    print(f"t2f train: {err}", file=sys.stderr)
                return code
        if stopping:
            accelerator.print(f"[t2f] signal {stop.signum}: checkpoint at step {step} written; exiting for requeue")
            return _finish(accelerator, monitor, REQUEUE_EXIT_CODE)
    return _finish(accelerator, monitor, 0)


def _clip(accelerator, model, cfg):
    """The gradient norm before clipping, as a tensor (read only at log steps: it syncs the GPU)."""
    if cfg.optim.grad_clip > 0 and accelerator.sync_gradients:
        norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        return norm if norm is not None else math.nan
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
    from t2f.exit_status import exit_process, ignore_stop_signals, run

    status = run(main)  # under ./launch: the status goes to the launcher, accelerate stays quiet
    ignore_stop_signals()  # the run is over: a stop signal resent now (train.sbatch does) must not kill the exit
    exit_process(status)
