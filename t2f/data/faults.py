"""Run-long accounting of bad data: corrupt samples and samples a shorter-than-promised shard lost.

The loader's workers count what they skip and carry the counts in each batch (`batch["faults"]`);
`DataAccounting` adds them up in the trainer, across workers and epochs, and says when the share
of bad samples passes `data.max_bad_fraction`.
"""

from pathlib import Path

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

    def update(self, batch: dict, check: bool = True) -> None:
        """Add the batch's faults; past the limit raise DataFaultError (unless check=False)."""
        faults = batch.get("faults") or {}
        self.read += faults.get("read", 0)
        self.corrupt += faults.get("corrupt", 0)
        self.lost += faults.get("lost", 0)
        for path, counts in faults.get("shards", {}).items():
            self.shards[path] = [a + b for a, b in zip(self.shards.get(path, [0, 0, 0]), counts)]
        if check and self.exceeded():
            raise self.error()

    def totals(self) -> dict:
        return {"corrupt_skipped": self.corrupt, "samples_lost": self.lost}

    def exceeded(self) -> bool:
        bad, seen = self.corrupt + self.lost, self.read + self.lost
        return self.max_bad_fraction is not None and bad > self.max_bad_fraction * max(seen, self.min_samples)

    def error(self) -> DataFaultError:
        """The error to stop with; also for a rank whose own data is fine when another rank's is not."""
        worst = sorted(self.shards.items(), key=lambda item: -sum(item[1][:2]))
        listed = ", ".join(f"{Path(p).name} ({fault_words(*counts)})" for p, counts in worst[:10])
        listed += f" and {len(worst) - 10} more" if len(worst) > 10 else ""
        folders = " ".join(sorted({str(Path(p).parent) for p in self.shards})) or "SHARDS"
        where = "passed" if self.exceeded() else "passed on another rank"
        return DataFaultError(
            f"data.max_bad_fraction={self.max_bad_fraction} {where}: {self.corrupt + self.lost} of "
            f"{self.read + self.lost} samples read here are bad ({fault_words(self.lost, self.corrupt)}); bad shards: "
            f"{listed or 'none here'}; fix: `t2f shards verify {folders}` and rebuild the shards it names")


def fault_words(lost: int, corrupt: int, short_reads: int = 1) -> str:
    lost_words = f"lost over {short_reads} reads" if short_reads > 1 else "lost"
    return ", ".join(f"{n} {word}" for n, word in ((lost, lost_words), (corrupt, "corrupt")) if n) or "0 bad"
