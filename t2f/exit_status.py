"""The trainer's exit status, carried past `accelerate launch` to `./launch train`.

Statuses: 0 done, 75 (T2F_REQUEUE_EXIT) stopped on request after a checkpoint, 2 bad input,
anything else failed. `accelerate launch` turns every non-zero status of a trainer process into
1 and a traceback of its own, so `./launch train` sets T2F_EXIT_DIR and the trainer, through
`run(main)` in its `__main__` block, reports there instead:

    <T2F_EXIT_DIR>/<pid>.running   while the process runs: `./launch` forwards SIGTERM/SIGUSR1 to it
    <T2F_EXIT_DIR>/<pid>.status    its status, written just before it exits

and exits 0 for the clean statuses (0, 2, 75), so the launcher stays quiet; a failure still exits
non-zero, so torchrun stops the other ranks instead of leaving them waiting in a collective.
Without T2F_EXIT_DIR (`python t2f/train.py`, a bare `accelerate launch`) the process exits with
its status unchanged. Standard library only: this runs before and after everything else.

`StopRequest` remembers a SIGTERM/SIGUSR1 (the stop that ends in status 75). The trainer installs
one before its slow imports and before it registers, so a signal during start-up is kept: under
Slurm the trainer starts with USR1 ignored (until then it is lost), elsewhere it would be killed.
Once its status is reported, `ignore_stop_signals()` keeps a late one (train.sbatch resends the
stop until the step ends) from killing it while Python shuts down.

`exit_process(status)` ends a process: `sys.exit` alone, or in one rank of a multi-process job
`os._exit` after flushing, so a run that succeeded is not turned into a SIGABRT by the interpreter's
teardown (its docstring says how).
"""

import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

EXIT_DIR_ENV = "T2F_EXIT_DIR"
BAD_INPUT = 2
INTERRUPTED = 130  # what a shell reports for Ctrl-C


class StopRequest:
    """Remembers a SIGTERM/SIGUSR1 so the loop can finish the step and checkpoint first."""

    def __init__(self):
        self.signum = 0
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum


_EARLY = []  # the StopRequest installed before the trainer's imports, until main() takes it


def install_early_stop_request() -> None:
    _EARLY.append(StopRequest())


def take_early_stop_request():
    """The early StopRequest, once (a second main() in one process starts with a fresh one); or None."""
    return _EARLY.pop() if _EARLY else None


def ignore_stop_signals() -> None:
    """For a process that is done and only exiting: Python puts back the default action of a handled
    signal (which kills) while it shuts down, so a stop signal resent then would end it by signal."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def exit_process(status: int) -> NoReturn:
    """End this process with `status`. In one rank of a multi-process job (WORLD_SIZE > 1, set by
    torchrun and `accelerate launch`) everything is written by now, so the interpreter's teardown is
    skipped: with gloo's worker threads still alive, the teardown sometimes aborts the rank ("terminate
    called without an active exception", SIGABRT: a C++ thread ended or destroyed where it must not be)
    and torchrun then reports a run that finished as failed. CI saw it once in ~40 two-rank DeepSpeed
    launches; two gloo ranks, one ending as a collective it joined late completes, did it in 14 of 14
    runs here (tests/test_exit_status.py), and none of 40 runs of it and its variants ended through this function."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        sys.exit(status)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)


def requeue_status() -> int:
    """Stopped on request after a checkpoint; defined in ./launch, 75 (EX_TEMPFAIL) without it."""
    return int(os.environ.get("T2F_REQUEUE_EXIT", "75"))


def clean_statuses() -> set:
    return {0, BAD_INPUT, requeue_status()}


def run(main, *args) -> int:
    """Call `main(*args)` and return the code this process should exit with (see the module doc):
    `sys.exit(run(main))`. An exception still prints its traceback and ends the process with 1."""
    directory = _exit_dir()
    if directory is not None:
        _write(directory / f"{os.getpid()}.running", "")
    try:
        status = _status_of(main, *args)
    except KeyboardInterrupt:
        _report(directory, INTERRUPTED)
        raise
    except BaseException:
        _report(directory, 1)
        raise
    _report(directory, status)
    return 0 if directory is not None and status in clean_statuses() else status


def _status_of(main, *args) -> int:
    try:
        result = main(*args)
    except SystemExit as stop:  # argparse (2), `raise SystemExit("message")` (1, message printed)
        result = stop.code
        if isinstance(result, str):
            print(result, file=sys.stderr)
            return 1
    return 0 if result is None else int(result)


def _exit_dir():
    """The launcher's folder; None without one (or when it is gone: a stale variable)."""
    value = os.environ.get(EXIT_DIR_ENV)
    return Path(value) if value and Path(value).is_dir() else None


def _report(directory, status: int) -> None:
    if directory is None:
        return
    _write(directory / f"{os.getpid()}.status", f"{status}\n")
    (directory / f"{os.getpid()}.running").unlink(missing_ok=True)


def _write(path: Path, text: str) -> None:
    """Renamed into place: the launcher never reads half a status."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
