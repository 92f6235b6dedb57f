"""A run that cannot be lost: what happens to a run directory when a run is resumed from an older
checkpoint, started twice, killed -9, runs out of disk, or crashes between log lines; and that a
project's group can read what it wrote. Real Accelerate saves of a tiny model on the CPU; the
second trainer and the killed one are real processes; the full disk is a real tmpfs when this
runs as root (CI does), and an injected ENOSPC otherwise."""

import errno
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import t2f.checkpointing as ckpt
from t2f.checkpointing import (
    CheckpointWriteError,
    RunDirError,
    clean_stale_tmp,
    hold_run_dir,
    latest_checkpoint,
    read_state,
    refuse_fresh_start,
    save_checkpoint,
)
from t2f.config import load_config
from t2f.data.vocab import Vocab
from t2f.monitor import Monitor
from t2f.rundir import LOCK_FILE, RunLock, holder_info, process_start

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def trainer():
    """(save(run_dir, step, keep_last=3), accelerator, model): a tiny model and AdamW prepared by a CPU Accelerator."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256)  # ~0.26 MB of weights: a checkpoint is ~1 MB
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    model(torch.randn(2, 256)).sum().backward()
    optimizer.step()  # AdamW's moments exist, as in a real checkpoint
    cfg, vocab = load_config("toy"), Vocab.build(["a smiling face"])

    def save(run_dir, step, keep_last=3, **extra):
        return save_checkpoint(accelerator, run_dir, step, model, cfg, vocab, {"step": step}, keep_last, **extra)

    return save, accelerator, model


def names(run_dir):
    return sorted(p.name for p in (Path(run_dir) / "checkpoints").iterdir())


# ----------------------------------------------------------------------------- 1. rotation and `latest`


def test_a_run_resumed_from_an_older_checkpoint_keeps_what_it_writes(trainer, tmp_path):
    save, _, _ = trainer
    for step in (100, 200, 300):
        save(tmp_path, step, keep_last=2)
    assert names(tmp_path) == ["latest", "step-00000200", "step-00000300"]
    # `--resume .../step-00000200` then training on: the new checkpoint sorts below step-00000300.
    save(tmp_path, 210, keep_last=2)
    assert latest_checkpoint(tmp_path).name == "step-00000210"
    assert read_state(latest_checkpoint(tmp_path))["step"] == 210  # the next start resumes here, not at 0
    save(tmp_path, 220, keep_last=2)
    # Two of this branch are kept; the other branch's step-00000300 waits until this run reaches step 300.
    assert names(tmp_path) == ["latest", "step-00000210", "step-00000220", "step-00000300"]
    save(tmp_path, 300, keep_last=2)
    assert names(tmp_path) == ["latest", "step-00000220", "step-00000300"]
    assert latest_checkpoint(tmp_path).name == "step-00000300"


def test_extra_weights_such_as_the_ema_are_saved_in_the_checkpoint(trainer, tmp_path):
    from safetensors.torch import load_file

    save, _, _ = trainer
    final = save(tmp_path, 1, extra_weights={"ema.safetensors": {"ca.fc.weight": torch.ones(2, 2)}})
    assert torch.equal(load_file(str(final / "ema.safetensors"))["ca.fc.weight"], torch.ones(2, 2))


def test_latest_naming_a_missing_checkpoint_is_an_error_not_a_fresh_start(trainer, tmp_path):
    save, _, _ = trainer
    save(tmp_path, 1)
    (tmp_path / "checkpoints" / "latest").write_text("step-00000009\n")
    with pytest.raises(RunDirError) as err:
        latest_checkpoint(tmp_path)
    message = str(err.value)
    assert "\n" not in message and "latest" in message and "step-00000009" in message
    assert "--resume" in message and "step-00000001" in message  # what to pass instead
    with pytest.raises(FileNotFoundError):  # `t2f generate --ckpt RUN` reports it like any missing checkpoint
        ckpt.resolve_checkpoint(tmp_path)


def test_resume_none_is_refused_on_a_run_that_has_checkpoints(trainer, tmp_path):
    save, _, _ = trainer
    refuse_fresh_start(tmp_path / "new")  # nothing there: a fresh start is fine
    save(tmp_path, 5)
    with pytest.raises(RunDirError, match=r"already has checkpoint step-00000005.*train\.run_dir.*checkpoints"):
        refuse_fresh_start(tmp_path)


# ----------------------------------------------------------------------------- 2. one trainer per run directory

HOLD = ("import sys, time; from t2f.rundir import RunLock; "
        "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)")


def start_holder(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_trainer_is_refused_and_a_killed_ones_lock_is_taken_over(trainer, tmp_path):
    _, accelerator, _ = trainer
    holder = start_holder(tmp_path)
    try:
        with pytest.raises(RunDirError) as err:
            with hold_run_dir(accelerator, tmp_path):
                pass
        message = str(err.value)
        assert "\n" not in message and f"pid {holder.pid}" in message and socket.gethostname() in message
        assert "started 20" in message and "train.run_dir" in message
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with hold_run_dir(accelerator, tmp_path):  # its holder was kill -9'd on this host: the lock is stale
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_FILE).exists()


def test_the_lock_is_released_when_the_run_raises(tmp_path):
    with pytest.raises(ValueError):
        with RunLock(tmp_path):
            assert (tmp_path / LOCK_FILE).is_file()
            raise ValueError("the run failed")
    assert not (tmp_path / LOCK_FILE).exists()
    with RunLock(tmp_path):  # and the next trainer gets it
        pass


def write_lock(run_dir, **changes):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_FILE).write_text(json.dumps({**holder_info(), **changes}))


@pytest.mark.parametrize("case, changes, env, stale", [
    ("pid reused", {"proc_start": (process_start(os.getpid()) or 0) + 1}, {}, True),
    ("rebooted", {"boot_id": "another-boot"}, {}, True),
    ("alive", {}, {}, False),
    ("requeued job", {"host": "node-a", "slurm_job": "77", "slurm_restart": "0"},
     {"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"}, True),
    ("same allocation", {"host": "node-a", "slurm_job": "77", "slurm_restart": "0"}, {"SLURM_JOB_ID": "77"}, False),
    ("other job", {"host": "node-a", "slurm_job": "76"}, {"SLURM_JOB_ID": "77"}, False),
    ("other host", {"host": "node-a", "pid": 1}, {}, False),
])
def test_a_lock_is_taken_over_only_when_its_holder_is_provably_gone(tmp_path, monkeypatch, case, changes, env, stale):
    for key in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    write_lock(tmp_path, **changes)
    if stale:
        with RunLock(tmp_path):
            assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] != changes.get("token")
        return
    with pytest.raises(RunDirError, match=r"in use by another trainer \(host "):
        RunLock(tmp_path).acquire()
    assert (tmp_path / LOCK_FILE).is_file()  # a live holder's lock is left alone


def test_a_lock_file_left_empty_by_a_killed_creator_is_taken_over(tmp_path):
    (tmp_path / LOCK_FILE).write_text("")
    os.utime(tmp_path / LOCK_FILE, (time.time() - 60, time.time() - 60))
    with RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_failure_while_preparing_the_run_directory_is_one_line_and_frees_the_lock(trainer, tmp_path):
    _, accelerator, _ = trainer

    def disk_full():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "config.yaml.tmp"))

    with pytest.raises(RunDirError, match=r"cannot write in .*No space left on device .*config\.yaml\.tmp"):
        with hold_run_dir(accelerator, tmp_path, prepare=disk_full):
            pass
    assert not (tmp_path / LOCK_FILE).exists()


def test_taking_the_run_directory_removes_saves_killed_midway(trainer, tmp_path):
    save, accelerator, _ = trainer
    save(tmp_path, 1)
    for junk in ("step-00000002.tmp", "step-00000001.trash"):
        (tmp_path / "checkpoints" / junk).mkdir()
        (tmp_path / "checkpoints" / junk / "model.safetensors").write_bytes(b"partial")
    with hold_run_dir(accelerator, tmp_path):
        assert names(tmp_path) == ["latest", "step-00000001"]
    assert clean_stale_tmp(tmp_path) == []


# ----------------------------------------------------------------------------- 3. a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 1.6 MB tmpfs: room for one checkpoint of the tiny model, not two. Needs root (CI runs as root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1600k", "tmpfs", str(mount)]).returncode:
        pytest.skip("mounting a tmpfs needs root; test_an_injected_enospc... covers the same path")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def assert_failed_cleanly(run_dir, err, kept="step-00000001"):
    message = str(err)
    assert "\n" not in message and f"no space left on the device of {run_dir}" in message
    assert "needs about 1." in message and f"{kept}) is intact" in message
    assert names(run_dir) == ["latest", kept]  # no partial step-00000002.tmp, the last one and `latest` kept
    assert latest_checkpoint(run_dir).name == kept


def test_a_full_disk_keeps_the_last_checkpoint_and_a_rerun_resumes(trainer, small_disk):
    save, accelerator, _ = trainer
    run = small_disk / "run"
    save(run, 1)
    with pytest.raises(CheckpointWriteError) as err:
        save(run, 2)
    assert_failed_cleanly(run, err.value)
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)  # the user frees space
    accelerator.load_state(str(latest_checkpoint(run)))  # the rerun resumes ...
    save(run, 2)  # ... and its next checkpoint is written
    assert latest_checkpoint(run).name == "step-00000002"


def test_an_injected_enospc_keeps_the_last_checkpoint(trainer, tmp_path, monkeypatch):
    save, accelerator, _ = trainer
    save(tmp_path, 1)
    real = ckpt.save_file

    def disk_full(tensors, path):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(ckpt, "save_file", disk_full)
    with pytest.raises(CheckpointWriteError) as err:
        save(tmp_path, 2)
    assert_failed_cleanly(tmp_path, err.value)
    monkeypatch.setattr(ckpt, "save_file", real)
    save(tmp_path, 2)
    assert latest_checkpoint(tmp_path).name == "step-00000002"


def test_checkpoint_files_reach_the_disk_before_the_rename(trainer, tmp_path, monkeypatch):
    save, _, _ = trainer
    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), replace(a, b))[1])
    final = save(tmp_path, 1)
    tmp = str(final) + ".tmp"
    rename = events.index(("replace", tmp, str(final)))
    flushed = {e[1] for e in events[:rename] if e[0] == "fsync"}
    files = {str(p).replace(str(final), tmp) for p in final.rglob("*")}
    assert files and files <= flushed, files - flushed
    after = [e for e in events[rename:] if e[0] == "fsync"]
    assert ("fsync", str(final.parent)) in after and ("fsync", str(final.parent / "latest.tmp")) in after


# ----------------------------------------------------------------------------- 4. metrics after a crash


def test_resuming_drops_metrics_logged_after_the_checkpoint(trainer, tmp_path):
    _, accelerator, _ = trainer
    lines = [json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n" for s in range(1, 7)]
    (tmp_path / "metrics.jsonl").write_text("".join(lines) + '{"step": 7, "train/lo')  # killed mid-line
    monitor = Monitor(accelerator, tmp_path, total_steps=8, start_step=4, wandb_on=False)  # resumed at step 4
    monitor.log(5, {"loss": 0.5})
    monitor.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


# ----------------------------------------------------------------------------- 5. group-readable


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o640, 0o750), (0o002, 0o664, 0o775)])
def test_a_checkpoint_is_readable_by_the_group(trainer, tmp_path, umask, file_mode, dir_mode):
    save, accelerator, _ = trainer
    old = os.umask(umask)
    try:
        run = tmp_path / "run"
        monitor = Monitor(accelerator, run, total_steps=1, start_step=0, wandb_on=False)
        run.mkdir()
        monitor.log(1, {"loss": 1.0})
        monitor.close()
        final = save(run, 1)
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path): stat.S_IMODE(p.stat().st_mode) for p in [run, *run.rglob("*")]}
    for written in (final / "t2f.safetensors", final / "optimizer.bin", run / "metrics.jsonl", run / "checkpoints" / "latest"):
        assert written.relative_to(tmp_path) in modes
    wrong = {str(p): oct(m) for p, m in modes.items() if m != (dir_mode if (tmp_path / p).is_dir() else file_mode)}
    assert not wrong, wrong


# ----------------------------------------------------------------------------- two ranks

PROBE = '''
import errno, json, os, sys
from pathlib import Path
import torch
from accelerate import Accelerator
from t2f.checkpointing import CheckpointWriteError, RunDirError, hold_run_dir, save_checkpoint
from t2f.exit_status import exit_process
from t2f.config import load_config
from t2f.data.vocab import Vocab

run, seen = Path(sys.argv[1]), {}
accelerator = Accelerator(cpu=True)
model, optimizer = accelerator.prepare(torch.nn.Linear(8, 8), torch.optim.AdamW(torch.nn.Linear(8, 8).parameters()))
cfg, vocab = load_config("toy"), Vocab.build(["a face"])
save = lambda step: save_checkpoint(accelerator, run, step, model, cfg, vocab, {"step": step}, 3)
with hold_run_dir(accelerator, run):
    save(1)
    if accelerator.process_index == 1:  # only rank 1's disk fills up, after it wrote its part
        real = accelerator.save_state
        def full(path):
            real(path)
            raise OSError(errno.ENOSPC, "No space left on device", path)
        accelerator.save_state = full
    try:
        save(2)
    except CheckpointWriteError as err:
        seen["save"] = str(err)
if accelerator.is_main_process:
    (run / "t2f.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "yesterday"}))
accelerator.wait_for_everyone()
try:
    with hold_run_dir(accelerator, run):
        pass
except RunDirError as err:
    seen["lock"] = str(err)
(run / f"rank{accelerator.process_index}.json").write_text(json.dumps(seen))
accelerator.wait_for_everyone()
torch.distributed.destroy_process_group()  # as t2f/train.py does
exit_process(0)  # as t2f/train.py ends: rank 0 of this probe aborted in the teardown in 2 of ~8 runs
'''


@pytest.mark.slow
def test_two_ranks_stop_together_with_one_message(tmp_path):
    """A failure on one rank, or a lock refusal on the main one, reaches every rank: no rank hangs."""
    probe, run = tmp_path / "probe.py", tmp_path / "run"
    probe.write_text(PROBE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", str(port), str(probe), str(run)]
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    seen = [json.loads((run / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert seen[0] == seen[1]
    assert f"no space left on the device of {run}" in seen[0]["save"] and "step-00000001) is intact" in seen[0]["save"]
    assert "host elsewhere, pid 1, started yesterday" in seen[0]["lock"]
    assert names(run) == ["latest", "step-00000001"]
