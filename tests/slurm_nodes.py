"""A two-node Slurm cluster on one machine: every daemon on a host of its own, made of namespaces.

    cluster = TwoNodeCluster(tmp_dir).start()    # needs root; the one-node tier does not
    job = cluster.sbatch("slurm/train.sbatch", ..., options=["--nodes=2"])
    cluster.lose_node("node1")                   # the node drops off the network, everything on it dies
    cluster.start_node("node1")                  # and comes back, at the same name and address
    cluster.stop()                               # daemons, namespaces, links: all gone

Each host (the controller `ctl`, `node0`, `node1`) is a holder process started by `unshare --net
--uts --mount`: its own network stack with one veth link into a bridge on this machine, its own
hostname, and a generated hosts file bound over /etc/hosts in its own mount namespace, so names
resolve on every host as on a real cluster and the hosts reach each other only over their
addresses (each has its own loopback). munged runs on this machine and is shared through its
socket file, as a cluster shares one munge key. The daemons are started inside with `nsenter`.

Names are unique per run (the pid and a counter: bridge `t2fb<tag>`, links `t2f<tag><host>`), the
/24 is one no route of this machine uses, and `stop()` removes exactly what it made: every process
inside a holder's network namespace (found by that namespace, not by name), the holders (their
namespaces, links and mounts go with them) and the bridge. Nothing is written outside the folder.
The daemon side is tests/slurm_cluster.py's; this file only places it on hosts.
"""

import ipaddress
import itertools
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from slurm_cluster import CONTROLLER, SlurmCluster, SlurmError, slurm_conf

NODES = ("node0", "node1")
CONTROLLER_HOST = "ctl"
TOOLS = ("ip", "unshare", "nsenter", "mount")
# How long the controller waits for a silent slurmd before it sets the node DOWN and ends (or
# requeues) its jobs. Slurm's default is 300 s; here a lost node must be noticed within a test.
SLURMD_TIMEOUT_S = 10
_RUNS = itertools.count()


class NamespaceUnavailable(SlurmError):
    """This machine cannot make network namespaces (not root, no CAP_SYS_ADMIN, no iproute2)."""


def namespaces_unavailable():
    """Why namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "two-node Slurm tests need root to create network namespaces"
    missing = [tool for tool in TOOLS if not shutil.which(tool)]
    if missing:
        return f"two-node Slurm tests need {', '.join(missing)} (packages iproute2, util-linux)"
    probe = subprocess.run(["unshare", "--net", "--uts", "--mount", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create namespaces (unshare: {probe.stderr.strip()})"
    return None


def ip(*args, check=True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise SlurmError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")
    return done


def unused_subnet(seed: int) -> ipaddress.IPv4Network:
    """A /24 in 10.200.0.0/14 that no route or address of this machine overlaps, chosen from `seed`
    so that two runs at once start their search in different places."""
    used = [ipaddress.ip_network(word, strict=False) for line in ip("-4", "route", "show", "table", "all").stdout.splitlines()
            for word in line.split()[:2] if word[0].isdigit()]
    candidates = list(ipaddress.ip_network("10.200.0.0/14").subnets(new_prefix=24))
    for i in range(len(candidates)):
        net = candidates[(seed + i) % len(candidates)]
        if not any(net.overlaps(other) for other in used):
            return net
    raise SlurmError("no free /24 in 10.200.0.0/14 for the test cluster")


def net_namespace(pid: int):
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:  # gone
        return None


class Host:
    """One host: a holder process in new network, UTS and mount namespaces, linked into `bridge`."""

    def __init__(self, name: str, address: str, prefix_len: int, link: str, bridge: str, hosts_file: Path):
        self.name, self.address, self.prefix_len = name, address, prefix_len
        self.link, self.bridge, self.hosts_file = link, bridge, hosts_file
        self.holder = None
        self.namespace = None

    def start(self):
        self.holder = subprocess.Popen(["unshare", "--net", "--uts", "--mount", "sleep", "infinity"],
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        ours = net_namespace(os.getpid())
        deadline = time.monotonic() + 10
        while (ns := net_namespace(self.holder.pid)) in (ours, None):  # until unshare exec'd `sleep` inside
            if self.holder.poll() is not None or time.monotonic() > deadline:
                raise SlurmError(f"host {self.name}: `unshare` did not start ({self.holder.returncode})")
            time.sleep(0.02)
        self.namespace = ns
        inner = f"{self.link}p"
        ip("link", "add", self.link, "type", "veth", "peer", "name", inner)
        ip("link", "set", self.link, "master", self.bridge, "up")
        ip("link", "set", inner, "netns", str(self.holder.pid))
        self.inside("ip", "link", "set", inner, "name", "eth0")
        self.inside("ip", "addr", "add", f"{self.address}/{self.prefix_len}", "dev", "eth0")
        self.inside("ip", "link", "set", "eth0", "up")
        self.inside("ip", "link", "set", "lo", "up")
        self.inside("hostname", self.name)
        self.inside("mount", "--bind", str(self.hosts_file), "/etc/hosts")  # only this host sees it
        return self

    def prefix(self) -> tuple:
        """Runs a command on this host (`nsenter` execs it: the pid is the command's)."""
        return ("nsenter", "-t", str(self.holder.pid), "-n", "-u", "-m")

    def inside(self, *cmd) -> str:
        done = subprocess.run([*self.prefix(), *cmd], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise SlurmError(f"host {self.name}: `{' '.join(cmd)}` failed: {done.stderr.strip()}")
        return done.stdout

    def processes(self) -> list:
        """Every process on this host but the holder: those in its network namespace."""
        if self.namespace is None:
            return []
        pids = [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
        return [pid for pid in pids if pid != self.holder.pid and net_namespace(pid) == self.namespace]

    def unplug(self) -> None:
        """The host drops off the network: nothing it sends arrives, not even a connection reset."""
        ip("link", "set", self.link, "down", check=False)

    def stop(self, timeout: float = 10) -> None:
        """Kill everything on the host, then the holder: its namespaces, link and mount go with it."""
        if self.holder is None:
            return
        deadline = time.monotonic() + timeout
        while (left := self.processes()) and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        if self.holder.poll() is None:
            self.holder.kill()
        self.holder.wait()
        ip("link", "del", self.link, check=False)  # normally gone with the namespace already
        self.holder = None
        self.namespace = None


class TwoNodeCluster(SlurmCluster):
    """slurmctld on host `ctl`, slurmd on `node0` and `node1`; see the module docstring."""

    def __init__(self, root):
        super().__init__(root)
        run = next(_RUNS)
        self.tag = f"{os.getpid()}{run}"
        self.bridge = f"t2fb{self.tag}"
        self.subnet = unused_subnet(os.getpid() * 8 + run)
        addresses = [str(a) for a in itertools.islice(self.subnet.hosts(), 1 + 1 + len(NODES))]
        self.bridge_address, self.controller_address = addresses[:2]
        self.nodes = dict(zip(NODES, addresses[2:]))
        self.hosts = {}  # host name -> Host, while it runs
        self.links = {name: f"t2f{self.tag}{i}" for i, name in enumerate((CONTROLLER_HOST, *NODES))}

    def start(self, timeout: float = 60):
        reason = namespaces_unavailable()
        if reason:
            raise NamespaceUnavailable(reason)
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._network_up()
        except BaseException:
            self.stop()
            raise
        return super().start(timeout)

    def _network_up(self):
        names = {CONTROLLER_HOST: self.controller_address, **self.nodes}
        hosts = self.root / "hosts"
        hosts.write_text("127.0.0.1 localhost\n" + "".join(f"{addr} {name}\n" for name, addr in names.items()))
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.bridge_address}/{self.subnet.prefixlen}", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for name in names:
            self._host_up(name)

    def _host_up(self, name: str):
        address = self.controller_address if name == CONTROLLER_HOST else self.nodes[name]
        host = Host(name, address, self.subnet.prefixlen, self.links[name], self.bridge, self.root / "hosts")
        self.hosts[name] = host
        host.start()

    def _conf_text(self, ctld_port: int, slurmd_port: int) -> str:
        return slurm_conf(self.root, ctld_port, slurmd_port, controller=f"{CONTROLLER_HOST}({self.controller_address})",
                          nodes=self.nodes, slurmd_timeout=SLURMD_TIMEOUT_S)

    def host_prefix(self, host: str) -> tuple:
        return self.hosts[CONTROLLER_HOST if host == CONTROLLER else host].prefix()

    def start_node(self, name: str, timeout: float = 60) -> None:
        if name not in self.hosts:  # a lost node comes back as a fresh host
            self._host_up(name)
        super().start_node(name)
        # A job submitted before the controller has seen the node's slurmd again was once given the
        # node and failed its step launch there ("Communication connection failure").
        self._until(lambda: self.node_states().get(name) == "idle", timeout, f"node {name} is idle (and responding) in sinfo")

    def lose_node(self, name: str) -> None:
        """As if the machine died: unplugged first (its peers hear nothing), then all on it killed."""
        host = self.hosts.pop(name)
        host.unplug()
        host.stop()
        self.procs.pop(f"slurmd-{name}").wait()

    def stop(self, timeout: float = 30):
        try:
            super().stop(timeout)
        finally:
            for name in list(self.hosts):
                self.hosts.pop(name).stop()
            ip("link", "del", self.bridge, check=False)
            for name in [n for n, proc in self.procs.items() if proc.poll() is not None]:
                self.procs.pop(name)

    def leftovers(self) -> list:
        """What of this cluster still exists on the machine (after stop(): nothing)."""
        links = ip("-o", "link", "show").stdout
        found = [f"link {name}" for name in (self.bridge, *self.links.values()) if f" {name}:" in links or f" {name}@" in links]
        return found + [f"process {name}" for name, proc in self.procs.items() if proc.poll() is None]
