"""`./launch train` outside Slurm: a SIGTERM or SIGUSR1 reaches every trainer process, which
checkpoints, and the launcher exits with the trainer's own status (75 stopped after a checkpoint,
2 bad input, 0 done, 1 failed) with no traceback for the clean ones; nothing is left running.
Also the trainer's side of that contract (t2f/exit_status.py) and the preset list in errors."""

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from t2f import exit_status
from t2f.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
ONE_CPU = "--cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no"

# A trainer in miniature: registers through t2f.exit_status, says when it is up, waits for
# SIGTERM/SIGUSR1 and returns STAND_IN_STATUS (at once when STAND_IN_WAIT=0).
STAND_IN = '''
import os, signal, sys, time
from pathlib import Path
from t2f.exit_status import run

def main():
    got = []
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: got.append(signum))
    out, rank = Path(os.environ["STAND_IN_DIR"]), os.environ.get("RANK", "0")
    (out / f"ready-{rank}").write_text(str(os.getpid()))
    deadline = time.monotonic() + (60 if os.environ.get("STAND_IN_WAIT", "1") == "1" else 0)
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    (out / f"got-{rank}").write_text(" ".join(map(str, got)))
    return int(os.environ["STAND_IN_STATUS"])

if __name__ == "__main__":
    sys.exit(run(main))
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_launch(args, tmp_path, **env) -> subprocess.Popen:
    """`./launch train ARGS` in its own session (so a failed test can end the whole tree)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "T2F_ACCELERATE_ARGS": ONE_CPU, "WANDB_MODE": "disabled", **env}
    return subprocess.Popen([str(ROOT / "launch"), "train", *map(str, args)], cwd=ROOT, env=env, text=True,
                            stdout=open(tmp_path / "launch.out", "w"), stderr=open(tmp_path / "launch.err", "w"),
                            start_new_session=True)


def wait_until(ready, proc, tmp_path, timeout=240):
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"./launch train ended ({proc.returncode}) before it was ready:\n{stderr(tmp_path)[-4000:]}")
        if time.monotonic() > deadline:
            end(proc)
            pytest.fail(f"./launch train not ready after {timeout} s:\n{stderr(tmp_path)[-4000:]}")
        time.sleep(0.2)


def finish(proc, tmp_path, timeout=180) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        end(proc)
        pytest.fail(f"./launch train still running {timeout} s after the signal (was it passed on?):\n"
                    f"{stderr(tmp_path)[-4000:]}")


def end(proc):
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def stderr(tmp_path) -> str:
    return (tmp_path / "launch.err").read_text(errors="replace")


def running_with(marker: str) -> list:
    """Pids of processes whose command line contains `marker` (a path unique to the test)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def stand_in(tmp_path) -> dict:
    script = tmp_path / "stand_in_trainer.py"
    script.write_text(STAND_IN)
    return {"T2F_TRAIN_SCRIPT": str(script), "STAND_IN_DIR": str(tmp_path)}


# ---------------------------------------------------------------------------- through ./launch train


@pytest.mark.slow
def test_sigterm_checkpoints_and_launch_train_exits_75_without_a_traceback(tmp_path):
    from tiny import tiny_overrides

    from t2f.checkpointing import latest_checkpoint

    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tmp_path, run_dir, steps=100_000)  # would take hours: only the stop ends it
    proc = start_launch(["--config", "toy", *overrides], tmp_path)
    metrics = run_dir / "metrics.jsonl"
    wait_until(lambda: metrics.exists() and metrics.read_text().count("\n") >= 2, proc, tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert finish(proc, tmp_path) == 75, stderr(tmp_path)[-4000:]
    assert latest_checkpoint(run_dir) is not None, "no checkpoint after the stop"
    assert "Traceback" not in stderr(tmp_path), stderr(tmp_path)[-4000:]
    assert not running_with(str(run_dir)), "a trainer process outlived ./launch train"


@pytest.mark.slow
def test_sigusr1_reaches_every_rank_and_their_status_is_the_runs(tmp_path):
    two_ranks = f"--multi_gpu --num_processes 2 --num_machines 1 --main_process_port {free_port()} " \
                "--mixed_precision no --dynamo_backend no"
    proc = start_launch([], tmp_path, **stand_in(tmp_path), STAND_IN_STATUS="75", T2F_ACCELERATE_ARGS=two_ranks,
                        ACCELERATE_USE_CPU="true")
    wait_until(lambda: all((tmp_path / f"ready-{rank}").exists() for rank in (0, 1)), proc, tmp_path)
    proc.send_signal(signal.SIGUSR1)
    assert finish(proc, tmp_path) == 75, stderr(tmp_path)[-4000:]
    for rank in (0, 1):
        assert (tmp_path / f"got-{rank}").read_text() == str(int(signal.SIGUSR1)), f"rank {rank} never got SIGUSR1"
    assert "Traceback" not in stderr(tmp_path), stderr(tmp_path)[-4000:]
    assert not running_with(str(tmp_path / "stand_in_trainer.py"))


@pytest.mark.slow
def test_bad_input_status_comes_through_as_2_and_a_failure_as_1(tmp_path):
    for status, expected in (("2", 2), ("1", 1)):
        proc = start_launch([], tmp_path, **stand_in(tmp_path), STAND_IN_STATUS=status, STAND_IN_WAIT="0")
        assert finish(proc, tmp_path) == expected, stderr(tmp_path)[-4000:]
        if expected == 2:
            assert "Traceback" not in stderr(tmp_path), stderr(tmp_path)[-4000:]


@pytest.mark.slow
def test_the_trainers_bad_input_exits_2_through_launch_train(tmp_path):
    # Needs t2f/train.py to return 2 on bad input (a config key that does not exist, here).
    proc = start_launch(["--config", "toy", "optim.no_such_key=1", f"train.run_dir={tmp_path / 'run'}"], tmp_path)
    assert finish(proc, tmp_path) == 2, stderr(tmp_path)[-4000:]
    err = stderr(tmp_path)
    assert "optim.no_such_key" in err and "Traceback" not in err, err[-4000:]


# ---------------------------------------------------------------------------- the trainer's side


def test_exit_status_reports_to_the_launcher_and_exits_quietly_for_clean_statuses(tmp_path, monkeypatch):
    monkeypatch.setenv(exit_status.EXIT_DIR_ENV, str(tmp_path))
    for status in (0, 2, 75):
        assert exit_status.run(lambda status=status: status) == 0  # `accelerate launch` sees success, so prints nothing
        assert (tmp_path / f"{os.getpid()}.status").read_text() == f"{status}\n"
        assert not (tmp_path / f"{os.getpid()}.running").exists()

    def broken():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):  # a failure keeps its traceback and its non-zero exit
        exit_status.run(broken)
    assert (tmp_path / f"{os.getpid()}.status").read_text() == "1\n"


def test_exit_status_without_the_launcher_is_the_real_status(monkeypatch, capsys):
    monkeypatch.delenv(exit_status.EXIT_DIR_ENV, raising=False)
    assert exit_status.run(lambda: 75) == 75
    assert exit_status.run(lambda: None) == 0

    def bad_args():
        raise SystemExit(2)  # what argparse does

    def no_checkpoint():
        raise SystemExit("--resume latest: runs/x has no checkpoint yet")

    assert exit_status.run(bad_args) == 2
    assert exit_status.run(no_checkpoint) == 1 and "has no checkpoint yet" in capsys.readouterr().err


def test_a_missing_preset_lists_only_training_presets():
    with pytest.raises(ConfigError) as err:
        load_config("no_such_preset")
    listed = str(err.value).split("presets: ")[1].split(", ")
    assert "toy" in listed and "accelerate_deepspeed" not in listed
    for name in listed:
        load_config(name)  # each one a training preset
