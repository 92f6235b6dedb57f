"""Checkpoints of a training run: atomic, rotated, resumable, and readable without Accelerate.

Layout of a run directory:

    RUN/config.yaml                      resolved config of the run
    RUN/t2f.lock                         held by the running trainer (t2f/rundir.py)
    RUN/checkpoints/latest               name of the newest complete checkpoint (one line)
    RUN/checkpoints/step-00001000/       one complete checkpoint:
        (accelerate save_state files)    model, optimiser, scheduler, scaler, RNG of every rank
        t2f.safetensors                  trainable weights (CA + mapper + recaptioner), unwrapped
        config.yaml, vocab.json          everything `t2f generate` / `t2f eval` need besides the
        state.json                       frozen models named in the config; step, epoch, ...

Only what trains is saved: the frozen generator, text encoder and the recaptioner's pretrained CNN
(ResNet-101, 170 MB) are rebuilt from the files the config names, so no file here holds them
(t2f/models/image_encoders.py keeps a frozen CNN outside the module tree that Accelerate saves).

A checkpoint is written to `step-XXXXXXXX.tmp` by every rank, fsynced, made group-readable and
renamed by the main process once all ranks are done; then `latest` is replaced atomically (and
fsynced): killing the run at any moment leaves the previous checkpoint complete and `latest`
naming a complete one. A save that fails (a full disk, any write error, on any rank) removes its
`.tmp`, leaves the previous checkpoint and `latest` alone, and raises `CheckpointWriteError` on
every rank. `.tmp` directories of killed saves are removed by `hold_run_dir` at the next start.

Rotation keeps the checkpoint just written and the `keep_last - 1` highest below it. Checkpoints
with a higher step (left by an earlier branch of the run, e.g. before `--resume PATH` picked an
older one) are kept until this run reaches their step and replaces them.

Problems with the run directory itself (locked by another trainer, `latest` naming a missing
checkpoint, a fresh start over existing checkpoints) raise `RunDirError` with one line that says
what to do.
"""

import errno
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from safetensors.torch import load_file, save_file

from t2f.config import load_config, save_config
from t2f.rundir import RunDirError, RunLock, agree, fsync_path, fsync_tree, share_with_group, write_durably

CKPT_DIR = "checkpoints"
WEIGHTS = "t2f.safetensors"
_COMPLETE = re.compile(r"step-(\d{8})")


class CheckpointNotFound(RunDirError, FileNotFoundError):
    pass


class CheckpointWriteError(Exception):
    """A checkpoint could not be written; the previous one and `latest` are intact."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(run_dir) -> list[Path]:
    """The complete checkpoints of a run, lowest step first."""
    root = Path(run_dir) / CKPT_DIR
    found = [p for p in root.glob("step-*") if _COMPLETE.fullmatch(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir) -> Path | None:
    """The newest complete checkpoint of a run, or None when it has none yet.

    Raises CheckpointNotFound (a RunDirError) when `latest` names a checkpoint that is not there:
    starting over at step 0 would silently throw the run away. Without a `latest` file (a run
    killed between its first rename and the pointer write) the highest complete checkpoint counts.
    """
    pointer = Path(run_dir) / CKPT_DIR / "latest"
    if not pointer.is_file():
        complete = complete_checkpoints(run_dir)
        return complete[-1] if complete else None
    name = pointer.read_text().strip()
    path = pointer.parent / name
    if name and _COMPLETE.fullmatch(name) and (path / "state.json").is_file():
        return path
    others = [p.name for p in complete_checkpoints(run_dir)]
    have = f"there: {', '.join(others[-3:])}" if others else "no complete checkpoint is there"
    example = pointer.parent / (others[-1] if others else "step-N")
    raise CheckpointNotFound(f"{pointer} names {name!r}, which is missing or incomplete ({have}); "
                             f"pass --resume PATH with an existing checkpoint, e.g. --resume {example}")


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


def refuse_fresh_start(run_dir) -> None:
    """`--resume none` on a run directory that has checkpoints: refuse rather than mix two runs in one directory."""
    complete = complete_checkpoints(run_dir)
    if complete:
        raise RunDirError(f"{run_dir} already has checkpoint {complete[-1].name} (--resume none would start a second run "
                          f"over it); choose another train.run_dir, or remove {Path(run_dir) / CKPT_DIR}")


def clean_stale_tmp(run_dir) -> list[Path]:
    """Remove what killed saves and rotations left (`*.tmp`, `*.trash`); call it holding the run's lock."""
    root = Path(run_dir) / CKPT_DIR
    stale = sorted(p for p in root.glob("step-*") if p.name.endswith((".tmp", ".trash")))
    stale += [p for p in [root / "latest.tmp"] if p.exists()]
    for path in stale:
        _remove(path)
    return stale


@contextmanager
def hold_run_dir(accelerator, run_dir, prepare=None):
    """Own `run_dir` for a whole run: the main process takes the lock, cleans stale saves, then
    calls `prepare()` (e.g. refuse_fresh_start, save_config) while holding it.

    Every rank must enter it; a refusal, or a RunDirError/OSError from `prepare`, raises the same
    RunDirError on every rank, so all of them stop with one message instead of some waiting in a
    collective. The lock is released on leaving, by an exception too.
    """
    lock, problem = None, None
    if accelerator.is_main_process:
        try:
            lock = RunLock(run_dir).acquire()
            clean_stale_tmp(run_dir)
            if prepare is not None:
                prepare()
        except RunDirError as err:
            problem = str(err)
        except OSError as err:
            problem = (f"cannot write in {run_dir}: {err.strerror} ({err.filename}); "
                       f"free space, fix its permissions, or choose another train.run_dir")
    problem = agree(accelerator, problem)
    try:
        if problem:
            raise RunDirError(problem)
        yield lock
    finally:
        if lock is not None:
            lock.release()


def save_checkpoint(accelerator, run_dir, step: int, model, cfg, vocab, state: dict, keep_last: int,
                    extra_weights: dict | None = None) -> Path:
    """Write a complete checkpoint for `step` on every rank; returns its final path.

    `extra_weights` ({file name: state dict}, e.g. {"ema.safetensors": ema.state_dict()}) are
    written beside t2f.safetensors by the main process. Raises CheckpointWriteError on every rank
    when any rank failed to write its part.
    """
    root = Path(run_dir) / CKPT_DIR
    final = root / checkpoint_name(step)
    tmp = root / (final.name + ".tmp")
    if accelerator.is_main_process:
        _remove(tmp)  # leftovers of a save killed at this same step
    accelerator.wait_for_everyone()
    failure = _attempt(lambda: _write_parts(accelerator, tmp, model, cfg, vocab, state, extra_weights or {}))
    accelerator.wait_for_everyone()  # every rank's files are written before they are flushed
    if failure is None and accelerator.is_main_process:
        share_with_group(tmp)
    if failure is None and accelerator.is_local_main_process:
        failure = _attempt(lambda: fsync_tree(tmp))  # once per node: each flushes what its ranks wrote
    failed = _Failed(accelerator, model, run_dir, tmp, final)
    failed.raise_if_any(failure)
    if accelerator.is_main_process:
        failure = _attempt(lambda: _publish(tmp, final, run_dir, keep_last))
    failed.raise_if_any(failure)
    return final


def read_state(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / "state.json").read_text())


def load_exported(ckpt):
    """(config, trainable state dict, vocabulary path) of a checkpoint, without Accelerate."""
    ckpt = resolve_checkpoint(ckpt)
    cfg = load_config(str(ckpt / "config.yaml"))
    return cfg, load_file(str(ckpt / WEIGHTS)), ckpt / "vocab.json"


# ----------------------------------------------------------------------------- the steps of a save


def _write_parts(accelerator, tmp: Path, model, cfg, vocab, state: dict, extra_weights: dict) -> None:
    accelerator.save_state(str(tmp))  # collective: every rank writes its part
    weights = accelerator.get_state_dict(model)  # collective under DeepSpeed ZeRO
    if accelerator.is_main_process:
        for name, tensors in {WEIGHTS: weights, **extra_weights}.items():
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / name))
        save_config(cfg, tmp / "config.yaml")
        vocab.save(tmp / "vocab.json")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))  # last: its presence marks a complete checkpoint


def _publish(tmp: Path, final: Path, run_dir, keep_last: int) -> None:
    """Main process: rename the flushed `.tmp` into place, point `latest` at it, rotate."""
    root = tmp.parent
    old = final.with_name(final.name + ".trash")
    if final.exists():  # a checkpoint of an abandoned branch at this step: move it aside, never half-delete it
        _remove(old)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(root)
    write_durably(root / "latest", final.name + "\n")
    _remove(old)
    _rotate(root, final, keep_last)
    share_with_group(run_dir, skip=[root])  # metrics, samples, config: group-readable as well
    share_with_group(root, skip=[p for p in root.iterdir() if p.is_dir()])  # `latest` and the folder itself


def _rotate(root: Path, newest: Path, keep_last: int) -> None:
    """Keep `newest` and the keep_last - 1 highest checkpoints below it; never touch higher ones."""
    below = [p for p in complete_checkpoints(root.parent) if p.name < newest.name]
    for old in below[: max(len(below) - (max(keep_last, 1) - 1), 0)]:
        _remove(old)


def _remove(path: Path) -> None:
    """Delete a checkpoint so that no half-deleted one can look complete: rename it to `.trash` first."""
    if not path.exists():
        return
    if path.is_dir():
        trash = path if path.name.endswith(".trash") else path.with_name(path.name + ".trash")
        if trash != path:
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- failures


def _attempt(action):
    """Run `action`; an Exception is returned (None on success) so that all ranks can agree on it."""
    try:
        action()
    except Exception as err:  # noqa: BLE001 -- writers report a full disk as RuntimeError/SafetensorError, not OSError
        return err
    return None


class _Failed:
    """Turns a failure on any rank into the same CheckpointWriteError on every rank."""

    def __init__(self, accelerator, model, run_dir, tmp: Path, final: Path):
        self.accelerator, self.model, self.run_dir, self.tmp, self.final = accelerator, model, run_dir, tmp, final

    def raise_if_any(self, failure: Exception | None) -> None:
        message = agree(self.accelerator, None if failure is None else self.message(failure))  # every rank calls
        if message is None:
            return
        if self.accelerator.is_main_process:
            _remove(self.tmp)
        if failure is not None and not _is_write_error(failure, self.tmp):
            raise failure  # a bug, not the disk: keep its own traceback
        raise CheckpointWriteError(message)

    def message(self, err: Exception) -> str:
        previous = _latest_or_none(self.run_dir)
        keep = f"the last checkpoint ({previous.name}) is intact" if previous else "there is no earlier checkpoint"
        if _is_disk_full(err, self.tmp):
            need = _tree_bytes(previous) if previous else _state_bytes(self.accelerator, self.model)
            return (f"no space left on the device of {self.run_dir} (this checkpoint needs about {_mb(need)}, "
                    f"{_mb(_free_bytes(self.run_dir))} free); {keep}: free space or move train.run_dir, then rerun to resume")
        return f"cannot write checkpoint {self.final}: {err}; {keep}: fix the cause, then rerun to resume"


def _latest_or_none(run_dir) -> Path | None:
    try:
        return latest_checkpoint(run_dir)
    except RunDirError:
        return None


def _is_disk_full(err: Exception, tmp: Path) -> bool:
    if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err).lower()
    if "no space left" in text or "os error 28" in text or "quota exceeded" in text:
        return True
    # torch.save reports a full disk as "unexpected pos ...": judge by what is left on the device
    return not isinstance(err, OSError) and _free_bytes(tmp.parent) < (1 << 20)


def _is_write_error(err: Exception, tmp: Path) -> bool:
    text = str(err).lower()
    return isinstance(err, OSError) or "os error" in text or "write" in text or _is_disk_full(err, tmp)


def _state_bytes(accelerator, model) -> int:
    """First save: the model twice (Accelerate's copy, t2f.safetensors) and two optimiser moments per trainable value."""
    net = accelerator.unwrap_model(model)
    total = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    trainable = sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)
    return 2 * total + 2 * trainable


def _tree_bytes(root: Path) -> int:
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total


def _free_bytes(path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def _mb(size: int) -> str:
    return f"{size / 1e6:,.0f} MB" if size >= 10e6 else f"{size / 1e6:.1f} MB"
