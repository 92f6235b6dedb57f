"""Run-long accounting of bad data: corrupt samples, and samples a shard lost (cut short, or a
remote shard that could not be read after bounded retries: t2f/data/remote.py).

The loader's workers count what they skip in a `FaultCounter` and carry the counts in each batch
(`batch["faults"]`); `DataAccounting` adds them up in the trainer, across workers and epochs, and
says when the share of bad samples passes `data.max_bad_fraction`. Shards are named as
`remote.public` shows them: a URL never carries its query string into a message.
"""

import warnings
from pathlib import Path

from t2f.data.remote import folder_of

MIN_JUDGED_SAMPLES = 1000  # DataAccounting judges the bad fraction over at least this many samples


class DataFaultError(RuntimeError):
    """Too many corrupt or lost samples; the message lists the bad shards and the fix."""


class DataAccounting:
    """Run-long totals of the data faults carried by a loader's batches, from every worker and epoch.

        accounting = DataAccounting(cfg.data.max_bad_fraction)   # once per run
        accounting.update(batch)                                 # every batch; may raise DataFaultError
        monitor.log(step, accounting.totals())                   # corrupt_skipped, samples_lost

    It stops once bad (corrupt + lost) samples pass `max_bad_fraction` of those read (whole or lost),
    the fraction taken over at least `min_samples`: one bad sample in the first 10 is no reason to
    stop, while a stream that is all bad still stops within ~max_bad_fraction * min_samples samples
    (10 by default). None never stops; 0 stops at the first bad one. Counts are per process: with
    several ranks, reduce `totals()` to log them and agree on `exceeded()` before raising `error()`.
    """

    def __init__(self, max_bad_fraction: float | None = None, min_samples: int = MIN_JUDGED_SAMPLES):
        if max_bad_fraction is not None and not 0 <= max_bad_fraction <= 1:
            raise ValueError(f"data.max_bad_fraction must be between 0 and 1, got {max_bad_fraction}")
        self.max_bad_fraction, self.min_samples = max_bad_fraction, min_samples
        self.read = self.corrupt = self.lost = 0
        self.shards = {}  # shard path -> [lost, corrupt, reads that came short]
        self.unreadable = {}  # remote shard -> why its last read gave up (its samples count as lost)

    def update(self, batch: dict, check: bool = True) -> None:
        """Add the batch's faults; past the limit raise DataFaultError (unless check=False)."""
        faults = batch.get("faults") or {}
        self.read += faults.get("read", 0)
        self.corrupt += faults.get("corrupt", 0)
        self.lost += faults.get("lost", 0)
        for path, counts in faults.get("shards", {}).items():
            self.shards[path] = [a + b for a, b in zip(self.shards.get(path, [0, 0, 0]), counts)]
        self.unreadable.update(faults.get("unreadable", {}))
        if check and self.exceeded():
            raise self.error()

    def warn_new_bad_shards(self, faults: dict) -> None:
        """Warn about the shards in a batch's `faults` that lost samples for the first time."""
        for path, (lost, _, reads) in faults.get("shards", {}).items():
            if not lost or self.shards.get(path, [0])[0]:
                continue
            if path in faults.get("unreadable", {}):
                warnings.warn(f"skipping shard {faults['unreadable'][path]}; its {lost // reads} unread samples count as "
                              "lost (data.max_bad_fraction) and the run goes on", stacklevel=3)
            else:
                warnings.warn(f"shard {path} is cut short or damaged: {lost // reads} samples lost each time it is "
                              f"read; check the shards with `t2f shards verify {folder_of(path)}`", stacklevel=3)

    def totals(self) -> dict:
        return {"corrupt_skipped": self.corrupt, "samples_lost": self.lost}

    def exceeded(self) -> bool:
        bad, seen = self.corrupt + self.lost, self.read + self.lost
        return self.max_bad_fraction is not None and bad > self.max_bad_fraction * max(seen, self.min_samples)

    def error(self) -> DataFaultError:
        """The error to stop with; also for a rank whose own data is fine when another rank's is not."""
        worst = sorted(self.shards.items(), key=lambda item: -sum(item[1][:2]))
        listed = ", ".join(f"{self._label(p)} ({fault_words(*counts)})" for p, counts in worst[:10])
        listed += f" and {len(worst) - 10} more" if len(worst) > 10 else ""
        folders = " ".join(sorted({folder_of(p) for p in self.shards})) or "SHARDS"
        where = "passed" if self.exceeded() else "passed on another rank"
        return DataFaultError(
            f"data.max_bad_fraction={self.max_bad_fraction} {where}: {self.corrupt + self.lost} of "
            f"{self.read + self.lost} samples read here are bad ({fault_words(self.lost, self.corrupt)}); bad shards: "
            f"{listed or 'none here'}; fix: `t2f shards verify {folders}` and rebuild the shards it names")

    def _label(self, path) -> str:
        """A local shard by its file name (the fix names the folder); an unreadable one by its URL and why."""
        return self.unreadable.get(path) or Path(path).name


def fault_words(lost: int, corrupt: int, short_reads: int = 1) -> str:
    lost_words = f"lost over {short_reads} reads" if short_reads > 1 else "lost"
    return ", ".join(f"{n} {word}" for n, word in ((lost, lost_words), (corrupt, "corrupt")) if n) or "0 bad"


class FaultCounter:
    """Per loader worker: samples read, corrupt and lost since its last batch, which carries them to
    the main process (workers are separate processes, restarted every epoch). In training, `limit`
    corrupt samples in a row stop the stream rather than let it spin."""

    def __init__(self, limit):
        self.consecutive, self.limit = 0, limit
        self.read, self.corrupt, self.lost, self.shards, self.unreadable = 0, 0, 0, {}, {}

    def skip(self, sample, err) -> None:
        self.corrupt += 1
        self.shards.setdefault(sample.get("__url__"), [0, 0, 0])[1] += 1
        self.consecutive += 1
        warnings.warn(f"skipping corrupt sample {sample.get('__key__')} in {sample.get('__url__')}: {err!r}", stacklevel=2)
        if self.limit and self.consecutive >= self.limit:
            raise RuntimeError(f"the last {self.limit} samples were all corrupt; check the shards with `t2f shards verify`")

    def lose(self, url, lost: int, unreadable: str | None = None) -> None:
        """`lost` samples of shard `url` (its public name) did not come out; `unreadable` says why a remote read gave up."""
        if unreadable:
            self.unreadable[url] = unreadable
        if lost > 0:
            self.lost += lost
            tally = self.shards.setdefault(url, [0, 0, 0])
            tally[0], tally[2] = tally[0] + lost, tally[2] + 1

    def pending(self) -> bool:
        return bool(self.read or self.corrupt or self.lost)

    def take(self) -> dict:
        faults = {"read": self.read, "corrupt": self.corrupt, "lost": self.lost, "shards": self.shards,
                  "unreadable": self.unreadable}
        self.read, self.corrupt, self.lost, self.shards, self.unreadable = 0, 0, 0, {}, {}
        return faults
