"""Checkpoints of a training run: atomic, rotated, resumable, and readable without Accelerate.

Layout of a run directory:

    RUN/config.yaml                      resolved config of the run
    RUN/checkpoints/latest               name of the newest complete checkpoint (one line)
    RUN/checkpoints/step-00001000/       one complete checkpoint:
        (accelerate save_state files)    model, optimiser, scheduler, scaler, RNG of every rank
        t2f.safetensors                  trainable weights (CA + mapper + recaptioner), unwrapped
        config.yaml, vocab.json          everything `t2f generate` / `t2f eval` need besides the
        state.json                       frozen models named in the config; step, epoch, ...

A checkpoint is written to `step-XXXXXXXX.tmp` by every rank and renamed by the main process
once all ranks are done, then `latest` is replaced atomically: killing the run at any moment
leaves the previous checkpoint complete and `latest` pointing at a complete one.
"""

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from t2f.config import load_config, save_config

CKPT_DIR = "checkpoints"
WEIGHTS = "t2f.safetensors"


class CheckpointNotFound(FileNotFoundError):
    pass


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def latest_checkpoint(run_dir) -> Path | None:
    """The newest complete checkpoint of a run, or None when it has none yet."""
    pointer = Path(run_dir) / CKPT_DIR / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if path.is_dir() else None


def resolve_checkpoint(run_or_ckpt) -> Path:
    """A run directory (-> its latest checkpoint) or a checkpoint directory -> checkpoint directory."""
    path = Path(run_or_ckpt)
    if (path / WEIGHTS).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is not None and (latest / WEIGHTS).is_file():
        return latest
    raise CheckpointNotFound(
        f"{path}: no t2f checkpoint here (expected {path / WEIGHTS} or a run directory with "
        f"{path / CKPT_DIR / 'latest'}); train one with `./launch train --config ...`"
    )


def save_checkpoint(accelerator, run_dir, step: int, model, cfg, vocab, state: dict, keep_last: int) -> Path:
    """Write a complete checkpoint for `step` on every rank; returns its final path."""
    root = Path(run_dir) / CKPT_DIR
    final = root / checkpoint_name(step)
    tmp = root / (final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a run killed mid-write
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # collective: every rank writes its part
    weights = accelerator.get_state_dict(model)  # collective under DeepSpeed ZeRO
    if accelerator.is_main_process:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / WEIGHTS))
        save_config(cfg, tmp / "config.yaml")
        vocab.save(tmp / "vocab.json")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomic(root / "latest", final.name + "\n")
        _rotate(root, keep_last)
    accelerator.wait_for_everyone()
    return final


def read_state(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / "state.json").read_text())


def load_exported(ckpt):
    """(config, trainable state dict, vocabulary path) of a checkpoint, without Accelerate."""
    ckpt = resolve_checkpoint(ckpt)
    cfg = load_config(str(ckpt / "config.yaml"))
    return cfg, load_file(str(ckpt / WEIGHTS)), ckpt / "vocab.json"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _rotate(root: Path, keep_last: int) -> None:
    complete = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in complete[: max(len(complete) - max(keep_last, 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
