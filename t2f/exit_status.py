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
"""

import os
import sys
from pathlib import Path

EXIT_DIR_ENV = "T2F_EXIT_DIR"
BAD_INPUT = 2
INTERRUPTED = 130  # what a shell reports for Ctrl-C


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
