"""The Slurm tier on two nodes: slurm/train.sbatch and slurm/eval.sbatch on a cluster of two hosts.

The hosts are namespaces on this machine (tests/slurm_nodes.py, fixture `two_node_cluster`): each
node has its own address, hostname and loopback, so the trainer's ranks meet only over the node
addresses, as on real hosts. What one node cannot show runs here: `--machine_rank` from
SLURM_NODEID, the first node's name as the rendezvous address, one `./launch train` per node under
srun, a stop and requeue that both nodes take part in, a node lost mid-run. One CPU rank per node
on gloo; OMP_NUM_THREADS=1 in every run compared, since the thread count changes float sums.
These tests skip where namespaces cannot be made (not root); about 3 minutes on a 2-core machine.
"""

import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_slurm import alive, job_env, metric_steps, script, wait_for_file

pytestmark = pytest.mark.slurm
ROOT = Path(__file__).resolve().parents[1]
# train.sbatch asks for 8 GPUs and 64 CPUs per node; one CPU rank per node here.
TWO_CPU_NODES = ["--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
# A lost node is noticed by the controller after SlurmdTimeout (10 s in slurm_nodes.py; Slurm's
# default is 300 s), which then ends the job's steps on the other node (SIGTERM, SIGKILL after
# KillWait = 5 s). Measured here: NODE_FAIL about 25 s after the loss.
LOST_NODE_TIMEOUT_S = 60


def toy_args(tmp: Path, steps: int, ckpt_every: int) -> list:
    """The toy preset at test size, with a saved generator (eval rebuilds the very same one)."""
    from tiny import tiny_overrides

    from t2f.config import load_config
    from t2f.models.generator import architecture_from_config, build_generator
    from t2f.models.weights import save_generator

    overrides = [o for o in tiny_overrides(tmp, tmp / "unused", steps) if not o.startswith(("train.run_dir=", "train.ckpt"))]
    torch.manual_seed(0)
    generator = build_generator(architecture_from_config(load_config("toy", overrides).generator), impl="ref")
    weights, _ = save_generator(generator, tmp / "generator")
    return ["--config", "toy", *overrides, f"generator.checkpoint={weights}", f"train.ckpt_every={ckpt_every}"]


def submit_train(cluster, tmp: Path, args, options=(), **env) -> str:
    return cluster.sbatch(ROOT / "slurm/train.sbatch", *args, env=job_env(tmp, T2F_CPU_PROCS="1", **ONE_THREAD, **env),
                          cwd=ROOT, options=[*TWO_CPU_NODES, *options, f"--output={tmp}/train-%j.out"])


def signal_batch_script(cluster, job, timeout: float = 10) -> None:
    """USR1 to the batch script as soon as Slurm can deliver it (its step may be a moment behind its output file)."""
    from slurm_cluster import SlurmError

    deadline = time.monotonic() + timeout
    while True:
        try:
            return cluster.signal(job, "USR1")
        except SlurmError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_local_run(tmp: Path, args, run_dir: Path) -> subprocess.Popen:
    """The same training as one node with 2 processes, through `./launch train` outside Slurm."""
    env = dict(os.environ, **ONE_THREAD, ACCELERATE_USE_CPU="true",
               T2F_ACCELERATE_ARGS=f"--multi_gpu --num_processes 2 --num_machines 1 --main_process_port {free_port()}")
    env.pop("SLURM_JOB_ID", None)
    log = open(tmp / "local-run.log", "w")
    return subprocess.Popen([str(ROOT / "launch"), "train", *args, f"train.run_dir={run_dir}"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def final_weights(run_dir: Path) -> dict:
    from t2f.checkpointing import latest_checkpoint

    return load_file(str(latest_checkpoint(run_dir) / "t2f.safetensors"))


# ---------------------------------------------------------------------------- the cluster


def test_each_node_is_a_host_of_its_own_and_finds_the_other_by_name(two_node_cluster, tmp_path):
    body = ('srun --ntasks-per-node=1 bash -c \'echo "$SLURM_NODEID $(hostname) '
            '$(getent hosts node0 | cut -d" " -f1) $(getent hosts node1 | cut -d" " -f1) '
            '$(ip -4 -o addr show eth0 | awk "{print \\$4}") '
            'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"\'\n')
    job = two_node_cluster.sbatch(script(tmp_path / "hosts.sh", body), cwd=tmp_path,
                                  options=["--nodes=2", f"--output={tmp_path}/%j.out"])
    two_node_cluster.wait(job, "COMPLETED", timeout=60)
    lines = sorted(line.split() for line in two_node_cluster.output(job).splitlines() if line[:1].isdigit())
    addr = two_node_cluster.nodes
    prefix = two_node_cluster.subnet.prefixlen
    assert lines == [["0", "node0", addr["node0"], addr["node1"], f"{addr['node0']}/{prefix}", "head=node0"],
                     ["1", "node1", addr["node0"], addr["node1"], f"{addr['node1']}/{prefix}", "head=node0"]]


def test_stop_ends_every_daemon_job_namespace_and_link_it_made(two_node_cluster, tmp_path):
    from slurm_nodes import TwoNodeCluster, net_namespace

    second = TwoNodeCluster(tmp_path / "second").start()  # beside the module's: no name or address collides
    try:
        assert second.subnet != two_node_cluster.subnet and second.bridge != two_node_cluster.bridge
        holders = {name: (host.holder.pid, host.namespace) for name, host in second.hosts.items()}
        body = f"srun --ntasks-per-node=1 bash -c 'sleep 300 & echo $! >> {tmp_path}/pids; wait'\n"
        long_job = script(tmp_path / "long.sh", body)
        second.sbatch(long_job, options=["--nodes=2", f"--output={tmp_path}/%j.out"], cwd=tmp_path)
        wait_for_file(tmp_path / "pids", timeout=60, ready=lambda p: p.exists() and len(p.read_text().split()) == 2)
    finally:
        second.stop()
    assert second.leftovers() == []
    namespaces = {ns for _, ns in holders.values()}
    inside = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if net_namespace(pid) in namespaces]
    assert inside == [], f"processes left on the stopped cluster's hosts: {inside}"
    assert not [pid for pid, _ in holders.values() if alive(pid)]
    assert not [int(pid) for pid in (tmp_path / "pids").read_text().split() if alive(int(pid))]
    assert all(proc.poll() is None for proc in two_node_cluster.procs.values()), "the other cluster must live on"


# ---------------------------------------------------------------------------- training on two nodes


@pytest.fixture(scope="module")
def two_node_run(two_node_cluster, tmp_path_factory):
    """A toy run on two nodes, stopped by USR1 twice: right after the job started (before any
    trainer imported torch) and mid-run. The same run on one node with 2 processes goes alongside."""
    tmp = tmp_path_factory.mktemp("two-node-run")
    steps = 100  # ~7 s of steps: the mid-run signal lands while they run
    args = toy_args(tmp, steps, ckpt_every=50)
    local = start_local_run(tmp, args, tmp / "local")
    try:
        job = submit_train(two_node_cluster, tmp, args)
        out = tmp / f"train-{job}.out"
        wait_for_file(out, timeout=60)  # the batch script is starting: nothing of the step exists yet
        signal_batch_script(two_node_cluster, job)
        run_dir = tmp / "runs" / f"t2f-train-{job}"
        wait_for_file(run_dir, timeout=240, ready=lambda d: max(metric_steps(d), default=0) >= 3)
        two_node_cluster.signal(job, "USR1")
        two_node_cluster.wait(job, "COMPLETED", timeout=300)
        local_status = local.wait(timeout=300)
    finally:
        if local.poll() is None:
            local.kill()
    return {"job": job, "run_dir": run_dir, "steps": steps, "tmp": tmp, "output": two_node_cluster.output(job),
            "restarts": two_node_cluster.job(job)["Restarts"], "local_dir": tmp / "local", "local_status": local_status}


def test_two_nodes_rendezvous_at_the_first_node_and_train_every_step_once(two_node_run):
    from t2f.checkpointing import latest_checkpoint, read_state

    run, output = two_node_run, two_node_run["output"]
    for node in (0, 1):
        assert f"[launch] node {node} of 2: 1 process(es) (0 GPU), rank 0 at node0" in output
    assert metric_steps(run["run_dir"]) == list(range(1, run["steps"] + 1))  # none lost, none twice
    ckpt = latest_checkpoint(run["run_dir"])
    assert read_state(ckpt)["step"] == run["steps"]
    assert sorted(p.name for p in ckpt.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]


def test_usr1_right_after_start_and_mid_run_both_checkpoint_requeue_and_resume(two_node_run):
    run, output = two_node_run, two_node_run["output"]
    assert run["restarts"] == "2", "each USR1 should have requeued the job once"
    stops = [int(step) for step in re.findall(r"signal 10: checkpoint at step (\d+) written", output)]
    # Every node's trainer prints (accelerator.print: each node's first process), so each stop twice.
    early, mid = sorted(set(stops))
    assert early == 1, "the USR1 sent as the job started should stop the trainer at its first step"
    assert 1 < mid < run["steps"] and stops.count(early) == stops.count(mid) == 2
    for step in (early, mid):
        assert output.count(f"resumed from {run['run_dir']}/checkpoints/step-{step:08d} at step {step}") == 2
    assert "Signal 10 (SIGUSR1) received" not in output, "a resent USR1 killed a process"


def test_two_node_weights_equal_a_one_node_two_process_run_bit_for_bit(two_node_run):
    run = two_node_run
    assert run["local_status"] == 0, (run["tmp"] / "local-run.log").read_text()[-3000:]
    two_nodes, one_node = final_weights(run["run_dir"]), final_weights(run["local_dir"])
    assert two_nodes.keys() == one_node.keys()
    # gloo's all-reduce of two ranks adds two numbers, which is exact whichever comes first, and a
    # resume restores every rank's RNG and data position: so bit for bit, across both requeues.
    for key, value in one_node.items():
        assert torch.equal(two_nodes[key], value), f"{key} differs"


def test_eval_sbatch_on_a_node_gives_the_metrics_of_a_local_t2f_eval(two_node_cluster, two_node_run):
    tmp, ckpt = two_node_run["tmp"], two_node_run["run_dir"]
    args = ["--ckpt", str(ckpt), "--device", "cpu", "--metrics", "bleu", "eval.batch_size=4"]
    job = two_node_cluster.sbatch(ROOT / "slurm/eval.sbatch", *args, "--out", tmp / "slurm-eval.json", cwd=ROOT,
                                  env={"T2F_CACHE": str(tmp / "cache"), **ONE_THREAD},
                                  options=["--gpus-per-node=0", "--cpus-per-task=1", "--nodelist=node1",
                                           f"--output={tmp}/eval-%j.out"])
    local = subprocess.run([str(ROOT / ".venv/bin/t2f"), "eval", *args, "--out", str(tmp / "local-eval.json")],
                           cwd=ROOT, env=dict(os.environ, **ONE_THREAD), capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-3000:]
    two_node_cluster.wait(job, "COMPLETED", timeout=180)
    on_node, here = (json.loads((tmp / name).read_text()) for name in ("slurm-eval.json", "local-eval.json"))
    assert on_node["metrics"] == here["metrics"] and on_node["metrics"]["bleu4"] >= 0
    assert on_node["checkpoint"] == here["checkpoint"] and on_node["step"] == two_node_run["steps"]


# ---------------------------------------------------------------------------- a node lost


def test_a_lost_node_ends_the_job_in_time_and_a_resubmission_resumes_without_losing_a_step(two_node_cluster, tmp_path):
    from t2f.checkpointing import latest_checkpoint, read_state

    steps = 40
    args = toy_args(tmp_path, steps, ckpt_every=10)
    # --no-requeue: the job must end, so that the user's resubmission is what continues it
    # (train.sbatch's own --requeue would have Slurm requeue it instead, once the node is back).
    job = submit_train(two_node_cluster, tmp_path, args, options=["--no-requeue"])
    run_dir = tmp_path / "runs" / f"t2f-train-{job}"
    wait_for_file(run_dir, timeout=240, ready=lambda d: max(metric_steps(d), default=0) >= 12)
    two_node_cluster.lose_node("node1")  # unplugged, then everything on it killed: node0 hears nothing
    last = read_state(latest_checkpoint(run_dir))["step"]  # node0 alone cannot finish another one
    assert 10 <= last < steps
    two_node_cluster.wait(job, ("NODE_FAIL", "FAILED"), timeout=LOST_NODE_TIMEOUT_S)  # not left hanging

    two_node_cluster.start_node("node1")
    resumed = submit_train(two_node_cluster, tmp_path, args, T2F_RUN_DIR=str(run_dir))
    two_node_cluster.wait(resumed, "COMPLETED", timeout=240)
    assert f"resumed from {run_dir}/checkpoints/step-{last:08d} at step {last}" in two_node_cluster.output(resumed)
    assert metric_steps(run_dir) == list(range(1, steps + 1))  # the steps after the checkpoint again, once each
