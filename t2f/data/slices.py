"""Array-job slicing of a shard build (`t2f shards build ... --num-slices N --slice I | --finalize`).

Every slice validates and plans the whole build exactly as a local build does, then writes only
its own shards: slice I of N owns the shards at positions p of the plan (splits in name order, then
shard index) with p % N == I. Round robin rather than contiguous blocks gives every slice a share
of every split, so slices take about the same time even though the splits differ in size.

A slice leaves no manifest.json and no vocab.json; it keeps a record in OUT, rewritten after
every shard so a re-run (and the finalize step) knows what is done:

    OUT/.slice-I-of-N.json  {"format": "t2f-shard-slice", "slice": I, "num_slices": N,
                             "complete": true, "text": {"dim": 512, "probe": {...}} | null,
                             "shards": [{"name", "count", "sha256", "inputs", "bytes", "skipped"?}]}

`--finalize` takes the sha256 from the records instead of hashing every shard again (the slice
computed it from the very file it renamed into place; re-reading a full-resolution dataset from a
shared file system would make the one-task manifest job take longer than a slice). It checks
that every slice finished, that each planned shard's record has the plan's `inputs` and that its
file is there with the recorded size; `t2f shards verify` re-hashes everything when wanted.
"""

import json
from pathlib import Path

from t2f.data.manifest import write_json_atomic

RECORD_FORMAT = "t2f-shard-slice"
RECORD_KEYS = ("name", "count", "sha256", "inputs", "skipped")


class SliceError(ValueError):
    """Finalize found slices that did not finish; the message names them and their shards."""


def check_slice_args(num_slices, slice_index, finalize: bool) -> None:
    if num_slices is None:
        if slice_index is not None or finalize:
            raise ValueError("--slice and --finalize need --num-slices N (the array's task count)")
        return
    if num_slices < 1:
        raise ValueError(f"--num-slices must be at least 1, got {num_slices}")
    if finalize == (slice_index is not None):
        raise ValueError("--num-slices N needs exactly one of --slice I (write slice I's shards) "
                         "or --finalize (write the manifest once every slice is done)")
    if slice_index is not None and not 0 <= slice_index < num_slices:
        raise ValueError(f"--slice {slice_index} is outside 0..{num_slices - 1} (--num-slices {num_slices})")


def slice_of(plan: list, index: int, count: int) -> list:
    """The planned shards slice `index` of `count` writes (round robin over the plan)."""
    return plan[index::count]


def record_path(out: Path, index: int, count: int) -> Path:
    return Path(out) / f".slice-{index}-of-{count}.json"


def write_record(out: Path, index: int, count: int, shards: list, entries: dict, text, complete: bool) -> dict:
    """Save what slice `index` has written so far (its `shards` that have an entry, in plan order)
    and `text`, its description of the text features (t2f/data/writer.py), for the manifest."""
    rows = []
    for shard in shards:
        entry = entries.get(shard["name"])
        if entry:
            row = {k: entry[k] for k in RECORD_KEYS if entry.get(k)}
            rows.append(dict(row, bytes=(Path(out) / shard["name"]).stat().st_size))
    record = {"format": RECORD_FORMAT, "slice": index, "num_slices": count, "complete": complete,
              "text": text, "shards": rows}
    write_json_atomic(record_path(out, index, count), record)
    return record


def _records(out: Path) -> list:
    """(path, record) of every slice record in `out`, of any slice count; unreadable ones skipped."""
    found = []
    for path in sorted(Path(out).glob(".slice-*-of-*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(record, dict) and record.get("format") == RECORD_FORMAT:
            found.append((path, record))
    return found


def recorded_entries(out: Path) -> dict:
    """{shard name: entry} from every slice record in `out`, so a re-run (or a local build after
    an array job) can keep shards whose file still matches the recorded sha256."""
    return {row["name"]: row for _, record in _records(out) for row in record.get("shards", [])}


def remove_records(out: Path) -> None:
    """The manifest now holds everything the records said; stale records would only mislead."""
    for path, _ in _records(out):
        path.unlink(missing_ok=True)


def collect_slices(out: Path, plan: list, count: int):
    """({shard name: entry} for the whole plan, text) from the N slice records (text: the first
    slice's description of the text features, or None), or a SliceError naming every slice that
    did not finish and what is wrong with its shards."""
    out = Path(out)
    entries, texts, problems = {}, [], []
    for index in range(count):
        path = record_path(out, index, count)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            record = None
        shards = slice_of(plan, index, count)
        if record is None:
            problems.append(f"slice {index}: no record {path.name} "
                            f"(it never ran, or failed before planning: see its job output); "
                            f"its shards: {_names(shards)}")
            continue
        texts.append(record.get("text"))
        rows = {row["name"]: row for row in record.get("shards", [])}
        bad = [f"{s['name']} ({why})" for s in shards if (why := _shard_problem(out, s, rows.get(s["name"])))]
        if bad or not record.get("complete"):
            problems.append(f"slice {index}: {'unfinished' if not record.get('complete') else 'finished'}"
                            + (f"; {', '.join(bad)}" if bad else ""))
            continue
        entries.update((s["name"], rows[s["name"]]) for s in shards)
    if problems:
        raise SliceError(f"{len(problems)} of {count} slice(s) did not finish in {out}:\n  " + "\n  ".join(problems)
                         + "\nre-run each with the same arguments and `--num-slices "
                         f"{count} --slice I` (its finished shards are kept), then --finalize again")
    return entries, next((t for t in texts if t is not None), None)


def _shard_problem(out: Path, shard: dict, row):
    if row is None:
        return "not written"
    if row.get("inputs") != shard["inputs"]:
        return "written from other inputs or settings"
    path = out / shard["name"]
    if not path.is_file():
        return "file missing"
    if path.stat().st_size != row.get("bytes"):
        return "file size differs from the record"
    return None


def _names(shards: list, show: int = 8) -> str:
    names = [s["name"] for s in shards]
    more = f", ... and {len(names) - show} more" if len(names) > show else ""
    return (", ".join(names[:show]) + more) if names else "none"
