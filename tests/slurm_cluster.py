"""A real one-node Slurm cluster on localhost, for the `slurm` test tier.

    cluster = SlurmCluster(tmp_dir).start()      # installs slurm-wlm + munge when missing
    job = cluster.sbatch("slurm/train.sbatch", "--config", "toy", options=["--cpus-per-task=2"])
    cluster.wait(job, "COMPLETED", timeout=300)
    cluster.stop()

Everything lives in one temporary folder: a fresh munge key and socket, slurm.conf (free ports
picked at run time, proctrack/linuxproc and task/none so no cgroups are needed, one node named
`localhost` with this machine's CPUs and memory), state, spool and logs. Slurm's command-line
tools find the cluster through `SLURM_CONF`, which is set in `cluster.env` only: the test
process's own environment is left alone. The three daemons run in the foreground as children of
this process, so `stop()` ends exactly those pids (after cancelling the jobs they run), never
anything found by name.

Without slurmdbd there is no accounting, so `sacct` does not work: job states come from
`scontrol show job`, and MinJobAge is high so finished jobs stay visible until the end.

Several nodes, each on a host of its own: tests/slurm_nodes.py's TwoNodeCluster sets `nodes`
and `host_prefix()` (where each daemon runs) and keeps the rest of this file.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd")
TOOLS = ("sbatch", "scontrol", "scancel", "sinfo", "squeue")
PARTITION = "debug"
CONTROLLER = "controller"  # host_prefix()'s name for where slurmctld runs
NODE = "localhost"  # also the address rank 0 listens on, so it must resolve
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                   "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# Lifetime of job credentials, which is also how long a requeued job waits before it may start
# again (Slurm's default: 120 s); long enough for a step to launch on a busy machine.
REQUEUE_DELAY_S = 10


class SlurmError(RuntimeError):
    """The cluster could not be installed or started, or a job did not end as expected."""


def ensure_installed() -> None:
    """Install Debian's slurm-wlm and munge (about 15 s) when a daemon or tool is missing."""
    if all(Path(d).exists() for d in DAEMONS) and all(shutil.which(t) for t in TOOLS):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmError("Slurm is not installed and this is not a root Debian/Ubuntu machine, so the "
                         "harness cannot apt-get install it. Install slurm-wlm and munge, or deselect "
                         "this tier: ./launch test -m 'not slurm'")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SlurmError(f"`{' '.join(cmd)}` failed ({done.returncode}):\n{done.stderr[-3000:]}")


def free_ports(count: int) -> list:
    """Ports nothing listens on now; all sockets are held until the end so they differ."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def node_resources() -> tuple:
    """(CPUs, MB of memory) as slurmd itself detects them (`slurmd -C`), so the node is not
    drained for declaring more than it has."""
    found = subprocess.run(["/usr/sbin/slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    cpus, mem_mb = (re.search(rf"\b{key}=(\d+)", found) for key in ("CPUs", "RealMemory"))
    if not (cpus and mem_mb):
        raise SlurmError(f"could not read CPUs and RealMemory from `slurmd -C`: {found!r}")
    return int(cpus.group(1)), int(mem_mb.group(1))


def slurm_conf(root: Path, ctld_port: int, slurmd_port: int, controller: str = NODE,
               nodes: dict = None, slurmd_timeout: int = 300) -> str:
    """The cluster's slurm.conf: `controller` is SlurmctldHost (`name` or `name(address)`), `nodes`
    maps node names to addresses (default: one node, localhost)."""
    cpus, mem_mb = node_resources()
    nodes = nodes or {NODE: "127.0.0.1"}
    # slurmstepd's sockets live in the spool folder and a socket path has at most 107 bytes: a
    # folder per node only where there are several.
    spool = f"{root}/spool" + ("/%n" if len(nodes) > 1 else "")
    node_lines = "\n".join(f"NodeName={name} NodeAddr={addr} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN"
                           for name, addr in nodes.items())
    return f"""\
# Test cluster written by tests/slurm_cluster.py
ClusterName=t2ftest
SlurmctldHost={controller}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire={REQUEUE_DELAY_S}
StateSaveLocation={root}/state
SlurmdSpoolDir={spool}
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={root}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
JobRequeue=1
MinJobAge=86400
KillWait=5
InactiveLimit=0
ReturnToService=2
SlurmdTimeout={slurmd_timeout}
{node_lines}
PartitionName={PARTITION} Nodes={",".join(nodes)} Default=YES MaxTime=INFINITE State=UP
"""


def parse_scontrol(line: str) -> dict:
    """`scontrol show job -o` prints `Key=value Key=value ...`; values may hold spaces."""
    fields = re.split(r"\s+(?=[A-Za-z][A-Za-z0-9_:/]*=)", line.strip())
    return dict(field.split("=", 1) for field in fields if "=" in field)


class SlurmCluster:
    """Start, use and stop the cluster; see the module docstring."""

    def __init__(self, root):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.procs = {}  # daemon name -> Popen
        self.nodes = {NODE: "127.0.0.1"}  # node name -> address; subclasses place nodes elsewhere

    # ------------------------------------------------------------------ life cycle

    def start(self, timeout: float = 60):
        ensure_installed()
        for sub in ("munge", "state", "spool", "run", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self.conf.write_text(self._conf_text(*free_ports(2)))
            (self.root / "plugstack.conf").write_text("")
            self._start_munged(timeout)
            self._spawn("slurmctld", ["/usr/sbin/slurmctld", "-D", "-i", "-f", str(self.conf)], self.host_prefix(CONTROLLER))
            self._until(lambda: self.run("scontrol", "ping", check=False).returncode == 0, timeout, "slurmctld answers")
            for name in self.nodes:
                self.start_node(name)
            self._until(self._nodes_idle, timeout, f"nodes {', '.join(self.nodes)} are idle in sinfo")
        except BaseException:
            self.stop()
            raise
        return self

    def _conf_text(self, ctld_port: int, slurmd_port: int) -> str:
        return slurm_conf(self.root, ctld_port, slurmd_port)

    def start_node(self, name: str) -> None:
        """Start the slurmd of node `name` (again, after it was lost)."""
        if len(self.nodes) > 1:
            (self.root / "spool" / name).mkdir(exist_ok=True, mode=0o700)  # SlurmdSpoolDir: one per node
        self._spawn(f"slurmd-{name}", ["/usr/sbin/slurmd", "-D", "-N", name, "-f", str(self.conf)], self.host_prefix(name))

    def host_prefix(self, host: str) -> tuple:
        """The command prefix that runs a daemon on `host` (CONTROLLER or a node name): here, this machine."""
        return ()

    def _start_munged(self, timeout):
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        sock = self.root / "munge" / "munge.socket"
        self._spawn("munged", ["/usr/sbin/munged", "--foreground", "--force", f"--socket={sock}",
                               f"--key-file={key}", f"--pid-file={self.root}/run/munged.pid",
                               f"--log-file={self.root}/log/munged.log",
                               f"--seed-file={self.root}/munge/munged.seed"])
        self._until(sock.exists, timeout, "munged's socket exists")

    def _spawn(self, name, cmd, prefix=()):
        """Start daemon `name` in the foreground; `prefix` (e.g. nsenter) runs it elsewhere and execs it."""
        log = open(self.root / "log" / f"{name}.console", "ab")
        # A session of its own: a Ctrl-C in the terminal reaches pytest, not the daemons.
        self.procs[name] = subprocess.Popen([*prefix, *cmd], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def _until(self, ready, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SlurmError(f"{name} exited with {proc.returncode} while waiting until {what}\n"
                                     + self.logs())
            if ready():
                return
            time.sleep(0.2)
        raise SlurmError(f"timed out after {timeout} s waiting until {what}\n" + self.logs())

    def node_states(self) -> dict:
        """Node name -> state as sinfo prints it (idle, alloc, down*, ...)."""
        done = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False)
        return dict(line.split() for line in done.stdout.splitlines() if len(line.split()) == 2)

    def _nodes_idle(self) -> bool:
        states = self.node_states()
        return all(states.get(name, "").rstrip("*") == "idle" for name in self.nodes)

    def stop(self, timeout: float = 30):
        """Cancel every job, then end the daemons this object started, by pid."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if jobs:
                self.run("scancel", *jobs, check=False)
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline and self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip():
                    time.sleep(0.5)
        slurmds = [name for name in self.procs if name.startswith("slurmd-")]
        for name in (*slurmds, "slurmctld", "munged"):
            self.end_daemon(name)

    def end_daemon(self, name: str, sig=signal.SIGTERM) -> None:
        """Stop one daemon this object started (TERM, then KILL after 15 s)."""
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def pids(self) -> dict:
        return {name: proc.pid for name, proc in self.procs.items()}

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            text = path.read_text(errors="replace")[-tail:]
            if text.strip():
                parts.append(f"--- {path.name} ---\n{text}")
        return "\n".join(parts)

    # ------------------------------------------------------------------ jobs

    def run(self, *cmd, check=True, env=None, cwd=None) -> subprocess.CompletedProcess:
        done = subprocess.run(list(cmd), env=env or self.env, cwd=cwd, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise SlurmError(f"`{' '.join(map(str, cmd))}` failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def sbatch(self, script, *args, options=(), env=None, cwd=None) -> str:
        """Submit `script args...` with extra sbatch `options`; returns the job id."""
        env = dict(self.env, **(env or {}))
        done = self.run("sbatch", "--parsable", *options, str(script), *map(str, args), env=env, cwd=cwd)
        return done.stdout.strip().split(";")[0]

    def job(self, job_id) -> dict:
        done = self.run("scontrol", "show", "job", "-o", str(job_id))
        return parse_scontrol(done.stdout.splitlines()[0])

    def jobs(self) -> list:
        """Every job the controller knows (array tasks one by one), as `job()` dicts."""
        done = self.run("scontrol", "show", "job", "-o")
        return [job for job in map(parse_scontrol, done.stdout.splitlines()) if "JobId" in job]

    def state(self, job_id) -> str:
        return self.job(job_id)["JobState"]

    def output(self, job_id) -> str:
        path = Path(self.job(job_id)["StdOut"])
        return path.read_text(errors="replace") if path.exists() else f"(no output file {path})"

    def wait(self, job_id, states=("COMPLETED",), timeout: float = 120) -> str:
        """Wait until the job is in one of `states`; a different final state is an error."""
        states = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        while True:
            state = self.state(job_id)
            if state in states:
                return state
            if state in TERMINAL_STATES or time.monotonic() > deadline:
                why = f"ended {state}" if state in TERMINAL_STATES else f"still {state} after {timeout} s"
                raise SlurmError(f"job {job_id} {why}, wanted {sorted(states)}\n{self.job(job_id)}\n"
                                 f"--- job output ---\n{self.output(job_id)[-4000:]}")
            time.sleep(0.5)

    def signal(self, job_id, sig: str = "USR1", batch_only: bool = True) -> None:
        """Send `sig` the way `#SBATCH --signal=B:SIG` does: to the batch shell alone, which
        forwards it (batch_only=False also signals every step, as a scheduler preemption does)."""
        where = ["--batch"] if batch_only else ["--full"]
        self.run("scancel", f"--signal={sig}", *where, str(job_id))
