"""A stop signal that reaches the trainer while it is still importing torch is kept, not fatal:
t2f/train.py installs its SIGUSR1/SIGTERM handler before its slow imports (the Slurm tier shows
the whole chain on two nodes, tests/test_slurm_two_nodes.py)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def wait_until_loading_torch(pid: int, timeout: float = 60) -> None:
    """Until torch's shared library is mapped: the process is inside `import torch`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "libtorch" in Path(f"/proc/{pid}/maps").read_text():
            return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} did not start importing torch within {timeout} s")


def test_usr1_while_the_trainer_imports_torch_stops_it_after_one_step_with_a_checkpoint(tmp_path):
    from tiny import tiny_overrides

    args = tiny_overrides(tmp_path, tmp_path / "run", steps=3)
    env = {k: v for k, v in os.environ.items() if k != "T2F_EXIT_DIR"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "t2f/train.py"), "--config", "toy", *args], cwd=tmp_path,
                            env=dict(env, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_loading_torch(proc.pid)
        proc.send_signal(signal.SIGUSR1)  # before the handler went in, this killed the process
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, f"exit {proc.returncode}:\n{output[-3000:]}"
    assert f"signal {int(signal.SIGUSR1)}: checkpoint at step 1 written" in output
    assert (tmp_path / "run" / "checkpoints" / "step-00000001").is_dir()
