"""Owning a run directory: one trainer at a time, durable writes, files the group can read.

`RunLock(run_dir)` is held by the main process for the whole run. It is a file created with
O_CREAT|O_EXCL holding JSON about the holder (host, pid, process start time, boot id, Slurm job
and restart count): run directories live on shared file systems (NFS, Lustre) where
`fcntl.flock` is unreliable, but exclusive creation is atomic on the server. A lock whose holder
is provably gone is taken over:
  - same host, and the pid is dead, or now belongs to another process (start time differs), or
    the machine rebooted since (boot id differs);
  - same Slurm job id but another restart count: a requeued job is the same job, and Slurm ends
    the old instance before it starts the new one. (Two trainers inside one allocation share the
    job id but not a restart count change, so they still exclude each other.)
Anything else (another host, no proof) is refused with one line naming the holder.

`RunDirError` is a run directory in a state the trainer will not guess about; its message is one
line saying which file says what and what the user does next (the CLI exits 2 on it).
"""

import errno
import json
import os
import socket
import stat
import time
import uuid
from pathlib import Path

LOCK_FILE = "t2f.lock"
_YOUNG_S = 5.0  # an unreadable lock younger than this may still be being written by its creator


class RunDirError(Exception):
    """The run directory is locked, inconsistent or refused for this start; the message says what to do."""


def agree(accelerator, message: str | None) -> str | None:
    """The first message any rank raised (None when none did); every rank must call it."""
    if accelerator.num_processes == 1:
        return message
    from accelerate.utils import gather_object

    return next((m for m in gather_object([message]) if m), None)


# ----------------------------------------------------------------------------- the lock


class RunLock:
    """Exclusive ownership of a run directory by one trainer (take it on the main process only).

    Other long jobs that own files reuse it with their own lock `path` (then `run_dir` only names what is
    held), the `owner` the busy message names and the `setting` it tells the user to change
    (`t2f toy pretrain`: OUT, OUT.lock, --out)."""

    def __init__(self, run_dir, path=None, owner: str = "trainer", setting: str = "train.run_dir"):
        self.run_dir = Path(run_dir)
        self.path = Path(path) if path else self.run_dir / LOCK_FILE
        self.owner, self.setting = owner, setting
        self.token = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = holder_info()
        for _ in range(100):
            if self._create(me):
                self.token = me["token"]
                return self
            raw = _read_bytes(self.path)
            if raw is None:
                continue  # released between our two calls: try again
            holder = _parse(raw)
            if holder is None and time.time() - _mtime(self.path) < _YOUNG_S:
                time.sleep(0.1)  # its creator is still writing it
                continue
            if holder is not None and not is_stale(holder, me):
                raise RunDirError(self._busy_message(holder))
            self._break(raw)
        raise RunDirError(f"{self.path}: could not take this lock (it keeps changing hands); "
                          f"make sure a single {self.owner} uses {self.run_dir}")

    def release(self) -> None:
        """Remove the lock file if it is still ours (someone may have judged us dead and taken it)."""
        if self.token is None:
            return
        holder = _parse(_read_bytes(self.path) or b"")
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        self.token = None

    def _create(self, me: dict) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:  # e.g. a full disk: leave no empty lock behind
            self.path.unlink(missing_ok=True)
            raise RunDirError(f"{self.path}: cannot write the run lock ({err.strerror}); "
                              f"free space on the device of {self.run_dir} or choose another {self.setting}") from None
        return True

    def _break(self, seen: bytes) -> None:
        """Move a stale lock aside; if it changed hands since we read it, put it back."""
        aside = self.path.with_name(f"{self.path.name}.{socket.gethostname()}.{os.getpid()}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another starter broke it first
        if _read_bytes(aside) != seen:  # a live holder's fresh lock: restore it unless a third took the name
            try:
                os.link(aside, self.path)
            except OSError:
                pass
        aside.unlink(missing_ok=True)

    def _busy_message(self, holder: dict) -> str:
        job = f", Slurm job {holder['slurm_job']}" if holder.get("slurm_job") else ""
        return (f"{self.run_dir} is in use by another {self.owner} (host {holder.get('host')}, pid {holder.get('pid')}, "
                f"started {holder.get('started')}{job}); wait for it to end or choose another {self.setting} "
                f"(if that {self.owner} is gone, delete {self.path})")


def holder_info() -> dict:
    """Who we are, as recorded in the lock file."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "proc_start": process_start(pid), "boot_id": _boot_id(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0"), "token": uuid.uuid4().hex}


def is_stale(holder: dict, me: dict) -> bool:
    """True only when the holder is provably gone (see the module docstring)."""
    if holder.get("slurm_job") and holder.get("slurm_job") == me["slurm_job"]:
        if str(holder.get("slurm_restart", "0")) != me["slurm_restart"]:
            return True
    if holder.get("host") != me["host"]:
        return False
    if holder.get("boot_id") and me["boot_id"] and holder["boot_id"] != me["boot_id"]:
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int) or not _pid_alive(pid):
        return True
    recorded, now = holder.get("proc_start"), process_start(pid)
    return recorded is not None and now is not None and recorded != now  # the pid was reused


def process_start(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (Linux), None where unknown."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text.rsplit(")", 1)[1].split()[19])  # field 22; the name before ')' may hold spaces


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _parse(raw: bytes) -> dict | None:
    try:
        holder = json.loads(raw)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


# ----------------------------------------------------------------------------- durable, shared files


def fsync_path(path) -> None:
    """Flush a file's or a directory's contents (a directory: its entries, i.e. renames) to the device."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):  # some file systems cannot fsync a directory
            raise
    finally:
        os.close(fd)


def fsync_tree(root) -> None:
    """fsync every file and directory under `root` (deepest first), then `root` itself."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(os.path.join(folder, name))
        fsync_path(folder)


def write_durably(path: Path, text: str) -> None:
    """Replace a small file atomically: write a temporary, fsync, rename, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def share_with_group(root, skip=()) -> None:
    """Give the group (at least) read access to everything under `root`, and traverse on directories.

    Bits are only added: what the umask grants a new file (e.g. g+w under umask 002, o+r under 022)
    plus g+r (g+rx for directories) even under a stricter umask. Writers such as safetensors
    create 0600 files whatever the umask, which would hide checkpoints from a project's group.
    """
    grant = 0o666 & ~_umask()
    skip = {Path(p) for p in skip}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if Path(folder, d) not in skip]
        _add_bits(folder, grant | (grant & 0o444) >> 2 | stat.S_IRGRP | stat.S_IXGRP)  # r -> x for directories
        for name in files:
            _add_bits(os.path.join(folder, name), grant | stat.S_IRGRP)


def _add_bits(path: str, bits: int) -> None:
    try:
        mode = os.lstat(path).st_mode
        if not stat.S_ISLNK(mode) and (mode | bits) != mode:
            os.chmod(path, stat.S_IMODE(mode) | bits)
    except OSError:
        pass  # another user's file, or gone: sharing is a courtesy, never a reason to fail a run


def _umask() -> int:
    """The process umask, read without changing it (os.umask would race with threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
