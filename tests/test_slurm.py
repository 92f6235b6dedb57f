"""The Slurm tier: the batch scripts in slurm/ on a real one-node cluster on localhost.

The cluster (tests/slurm_cluster.py, fixture `slurm_cluster` in conftest.py) is installed and
started once per session. Three groups:
- the cluster itself and Slurm's signal and requeue behaviour the scripts rely on;
- slurm/train.sbatch and `./launch train`'s Slurm wiring, with a stand-in trainer that keeps the
  trainer's contract (checkpoint on USR1, exit non-zero, resume from `latest`);
- the real thing: t2f/train.py on the toy preset, and the shard builder as an array job.
Run only this tier with `./launch test -m slurm`; skip it with `./launch test -m "not slurm"`.
"""

import json
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm
ROOT = Path(__file__).resolve().parents[1]
# train.sbatch asks for 2 nodes x 8 GPUs; the test node has neither, and 2 CPUs.
ONE_CPU_NODE = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2"]


def script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


def wait_for_file(path: Path, timeout: float, ready=lambda p: p.exists()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready(path):
            return
        time.sleep(0.1)
    raise AssertionError(f"{path} not ready after {timeout} s")


def alive(pid: int) -> bool:
    """Running, or stopped: anything but gone or a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def job_env(tmp_path: Path, **extra) -> dict:
    """What a job of train.sbatch needs here: CPU processes, caches and run dirs in tmp."""
    return {"T2F_GPUS_PER_NODE": "0", "T2F_CPU_PROCS": "2", "T2F_CACHE": str(tmp_path / "cache"),
            "T2F_RUNS": str(tmp_path / "runs"), **extra}


# ---------------------------------------------------------------------------- the cluster


def test_a_batch_job_completes_and_sees_its_allocation(slurm_cluster, tmp_path):
    job_script = script(tmp_path / "hello.sh", 'echo "id=$SLURM_JOB_ID nodes=$SLURM_NNODES '
                        'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"\n')
    job = slurm_cluster.sbatch(job_script, options=[f"--output={tmp_path}/%j.out"], cwd=tmp_path)
    slurm_cluster.wait(job, "COMPLETED", timeout=60)
    assert f"id={job} nodes=1 head=localhost" in slurm_cluster.output(job)


def test_usr1_reaches_the_batch_trap_and_a_requeued_job_runs_again(slurm_cluster, tmp_path):
    job_script = script(tmp_path / "requeue.sh", f"""
cd {tmp_path}
echo "restart=${{SLURM_RESTART_COUNT:-0}}" >> runs.log
[[ ${{SLURM_RESTART_COUNT:-0}} -ge 1 ]] && exit 0
sleep 300 &
trap "echo USR1 > trapped; kill $!; scontrol requeue $SLURM_JOB_ID; exit 0" USR1
touch started
wait
""")
    job = slurm_cluster.sbatch(job_script, options=["--requeue", f"--output={tmp_path}/%j.out"], cwd=tmp_path)
    wait_for_file(tmp_path / "started", timeout=60)
    slurm_cluster.signal(job, "USR1")
    slurm_cluster.wait(job, "COMPLETED", timeout=90)
    assert (tmp_path / "trapped").read_text().strip() == "USR1"
    assert (tmp_path / "runs.log").read_text().split() == ["restart=0", "restart=1"]
    assert slurm_cluster.job(job)["Restarts"] == "1"


def test_stop_cancels_jobs_and_ends_only_the_daemons_it_started(slurm_cluster, tmp_path):
    from slurm_cluster import SlurmCluster

    second = SlurmCluster(tmp_path / "second").start()
    try:
        daemons = second.pids()
        long_job = script(tmp_path / "long.sh", f"sleep 300 & echo $$ $! > {tmp_path}/pids; wait\n")
        second.sbatch(long_job, options=[f"--output={tmp_path}/%j.out"], cwd=tmp_path)
        wait_for_file(tmp_path / "pids", timeout=60, ready=lambda p: p.exists() and p.read_text().strip())
    finally:
        second.stop()
    job_pids = [int(pid) for pid in (tmp_path / "pids").read_text().split()]
    assert not [pid for pid in daemons.values() if alive(pid)]
    deadline = time.monotonic() + 10  # the job's processes may take a moment to be reaped
    while [pid for pid in job_pids if alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in job_pids if alive(pid)], "stop() left the job's processes running"
    assert all(proc.poll() is None for proc in slurm_cluster.procs.values()), "the other cluster must live on"


# ---------------------------------------------------------------------------- train.sbatch wiring

# The trainer's Slurm contract, in miniature: a stop signal is agreed on by all ranks after the
# current step, rank 0 writes the step to `latest`, the process exits non-zero; a new start
# resumes from `latest`. Every rank logs each step it trains to rank<i>.log.
STAND_IN_TRAINER = '''
import json, os, signal, sys, time
from pathlib import Path
import torch
from accelerate import Accelerator

stop = []
for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, lambda *_: stop.append(1))
opts = dict(arg.split("=", 1) for arg in sys.argv[1:] if "=" in arg)
run_dir, steps = Path(opts["train.run_dir"]), int(opts["train.steps"])
acc = Accelerator()
run_dir.mkdir(parents=True, exist_ok=True)
latest = run_dir / "latest"
step = int(latest.read_text()) if latest.exists() else 0
if acc.is_main_process:
    keys = ["SLURM_JOB_ID", "SLURM_RESTART_COUNT", "MASTER_ADDR", "MASTER_PORT", "T2F_REQUEUE_EXIT", "HF_HOME"]
    info = {key: os.environ.get(key) for key in keys}
    (run_dir / f"start-{step}.json").write_text(json.dumps(dict(info, world=acc.num_processes)))
with open(run_dir / f"rank{acc.process_index}.log", "a") as log:
    while step < steps:
        time.sleep(0.2)
        step += 1
        print(step, file=log, flush=True)
        if acc.reduce(torch.tensor([float(bool(stop))]), reduction="sum").item() > 0:
            break
acc.wait_for_everyone()
if acc.is_main_process:
    (run_dir / "latest.tmp").write_text(str(step))
    os.replace(run_dir / "latest.tmp", latest)
acc.wait_for_everyone()
torch.distributed.destroy_process_group()
sys.exit(3 if step < steps else 0)
'''


def submit_train(cluster, tmp_path, *args, **env):
    return cluster.sbatch(ROOT / "slurm/train.sbatch", *args, env=job_env(tmp_path, **env), cwd=ROOT,
                          options=[*ONE_CPU_NODE, f"--output={tmp_path}/train-%j.out"])


def logged_steps(run_dir: Path, rank: int) -> list:
    path = run_dir / f"rank{rank}.log"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


@pytest.fixture
def stand_in(tmp_path):
    path = tmp_path / "stand_in_trainer.py"
    path.write_text(STAND_IN_TRAINER)
    return str(path)


def test_train_sbatch_runs_two_ranks_and_requeues_on_usr1_without_losing_a_step(slurm_cluster, tmp_path, stand_in):
    steps = 20
    job = submit_train(slurm_cluster, tmp_path, f"train.steps={steps}", T2F_TRAIN_SCRIPT=stand_in)
    run_dir = tmp_path / "runs" / f"t2f-train-{job}"  # named after the job, so a requeue finds it
    wait_for_file(run_dir, timeout=120, ready=lambda d: len(logged_steps(d, 0)) >= 3)
    slurm_cluster.signal(job, "USR1")  # as Slurm does 180 s before the time limit
    slurm_cluster.wait(job, "COMPLETED", timeout=150)
    assert slurm_cluster.job(job)["Restarts"] == "1"
    starts = sorted(run_dir.glob("start-*.json"), key=lambda p: int(p.stem.split("-")[1]))  # start-<step>.json
    assert len(starts) == 2, "the requeued job should resume in the same run directory"
    first, resumed = (json.loads(p.read_text()) for p in starts)
    assert first["world"] == 2 and first["SLURM_JOB_ID"] == job and first["SLURM_RESTART_COUNT"] is None
    assert int(first["MASTER_PORT"]) == 20000 + int(job) % 20000
    assert first["T2F_REQUEUE_EXIT"] == "75" and first["HF_HOME"] == str(tmp_path / "cache" / "huggingface")
    assert resumed["SLURM_RESTART_COUNT"] == "1" and resumed["world"] == 2
    for rank in (0, 1):
        assert logged_steps(run_dir, rank) == list(range(1, steps + 1))  # none lost, none twice
    output = slurm_cluster.output(job)
    assert "node 0 of 1: 2 process(es) (0 GPU), rank 0 at localhost" in output
    assert "requeueing job" in output


# ---------------------------------------------------------------------------- the real trainer
# These need t2f/train.py, the toy preset and tests/tiny.py (training issue), and the shard
# builder's --num-slices/--slice/--finalize (data issue).


def tiny_train_args(tmp_path, steps):
    from tiny import tiny_overrides  # tiny shards and text encoder, built once in tmp_path

    overrides = [o for o in tiny_overrides(tmp_path, tmp_path / "unused", steps) if not o.startswith("train.run_dir=")]
    return ["--config", "toy", *overrides]


def metric_steps(run_dir: Path) -> list:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    complete_lines = path.read_text().split("\n")[:-1]  # the last one may be half written
    return [json.loads(line)["step"] for line in complete_lines if '"train/loss"' in line]


def test_toy_training_on_two_cpu_ranks_survives_usr1_and_trains_every_step_once(slurm_cluster, tmp_path):
    # One job covers both of the cases: the requeued half is a plain run to COMPLETED.
    from t2f.checkpointing import latest_checkpoint, read_state

    steps = 40
    job = submit_train(slurm_cluster, tmp_path, *tiny_train_args(tmp_path, steps))
    run_dir = tmp_path / "runs" / f"t2f-train-{job}"
    wait_for_file(run_dir, timeout=240, ready=lambda d: len(metric_steps(d)) >= 2)
    slurm_cluster.signal(job, "USR1")
    slurm_cluster.wait(job, "COMPLETED", timeout=300)
    assert slurm_cluster.job(job)["Restarts"] == "1", "the job should have been requeued once"
    output = slurm_cluster.output(job)
    assert "checkpoint at step" in output and "resumed from" in output
    assert metric_steps(run_dir) == list(range(1, steps + 1))  # no step lost, none done twice
    ckpt = latest_checkpoint(run_dir)
    assert read_state(ckpt)["step"] == steps
    # Accelerate's save_state writes one RNG file per process: both ranks took part.
    assert (ckpt / "random_states_0.pkl").exists() and (ckpt / "random_states_1.pkl").exists()


def test_array_shard_job_writes_the_same_shards_and_manifest_as_a_local_build(slurm_cluster, tmp_path):
    import subprocess

    from PIL import Image

    lines = []
    for i in range(10):
        image = tmp_path / "src" / f"{i}.png"
        image.parent.mkdir(exist_ok=True)
        Image.new("RGB", (24, 24), (25 * i, 100, 200 - 10 * i)).save(image)
        lines.append(json.dumps({"image": str(image), "captions": [f"face number {i} ."],
                                 "split": "train" if i < 7 else "test"}))
    (tmp_path / "faces.jsonl").write_text("\n".join(lines) + "\n")
    build = ["--source", "jsonl", "--manifest", str(tmp_path / "faces.jsonl"), "--resolution", "16", "--shard-size", "2"]
    t2f = str(ROOT / ".venv/bin/t2f")
    subprocess.run([t2f, "shards", "build", *build, "--out", str(tmp_path / "local"), "--workers", "1"], check=True)

    array = slurm_cluster.sbatch(ROOT / "slurm/shards.sbatch", *build, "--out", tmp_path / "array", cwd=tmp_path,
                                 options=["--array=0-1", "--cpus-per-task=1"], env={"T2F_ROOT": str(ROOT)})
    deadline = time.monotonic() + 60
    while not (finals := [j for j in slurm_cluster.jobs() if j["JobName"] == "t2f-shards-manifest"]):
        assert time.monotonic() < deadline, "the first array task did not submit the manifest job"
        time.sleep(0.5)
    try:
        slurm_cluster.wait(finals[0]["JobId"], "COMPLETED", timeout=120)
    except Exception:
        tasks = [j for j in slurm_cluster.jobs() if j.get("ArrayJobId") == array]
        print("\n".join(Path(t["StdOut"]).read_text() for t in tasks if Path(t["StdOut"]).exists()))
        raise

    def comparable(folder):
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest.pop("options")  # the command line, which names the output folder
        return manifest

    assert comparable(tmp_path / "array") == comparable(tmp_path / "local")
    assert comparable(tmp_path / "array")["complete"] is True
    assert (tmp_path / "array/vocab.json").read_bytes() == (tmp_path / "local/vocab.json").read_bytes()

    # One slice at a time, as the script's header says to re-run a failed slice: slice 0 alone
    # leaves the manifest job failing (slice 1 missing); slice 1 alone then completes the build.
    def manifest_jobs():
        return sorted(int(j["JobId"]) for j in slurm_cluster.jobs() if j["JobName"] == "t2f-shards-manifest")

    for index, outcome in ((0, "FAILED"), (1, "COMPLETED")):
        before = manifest_jobs()
        slurm_cluster.sbatch(ROOT / "slurm/shards.sbatch", *build, "--out", tmp_path / "rerun", cwd=tmp_path,
                             options=[f"--array={index}", "--cpus-per-task=1"],
                             env={"T2F_ROOT": str(ROOT), "T2F_SHARDS_SLICES": "2"})
        deadline = time.monotonic() + 60
        while len(jobs := manifest_jobs()) == len(before):
            assert time.monotonic() < deadline, f"slice {index} did not submit the manifest job"
            time.sleep(0.5)
        slurm_cluster.wait(jobs[-1], outcome, timeout=120)
    assert comparable(tmp_path / "rerun") == comparable(tmp_path / "local")
