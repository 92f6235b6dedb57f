"""The shard manifest (`OUT/manifest.json`): its schema, reading, writing and `verify`.

    {
      "format": "t2f-shards", "builder_version": 1,
      "complete": true,                 # false while a build runs or after one failed
      "source": "mmcelebahq",           # mmcelebahq | celebatext | jsonl | custom (Python API)
      "resolution": 256, "image_format": "png", "quality": null,   # quality: JPEG only
      "shard_size": 1000,
      "text_encoder": null | {"name": "...", "dim": 512, "dtype": "float16", "file": "text.npy"},
      "attributes": ["5_o_Clock_Shadow", ...],   # names, in column order; [] when unknown
      "vocab": "vocab.json",            # beside the manifest; built from train captions only
      "options": {...},                 # the build command's options, for the record
      "splits": {"train": {"count": 24000, "shards": [
          {"name": "train-000000.tar", "count": 1000, "sha256": "...", "inputs": "...",
           "skipped": [[id, reason, split], ...]}       # skipped: only when an image failed to decode
      ]}, "test": {...}},
      "skipped": [{"id": "123", "split": "train", "reason": "empty caption file ..."}]
    }

`inputs` fingerprints what a shard was made from (ids, captions, attributes, image files,
settings); a rebuild keeps a shard only if its inputs and its file's sha256 both still match.
"""

import hashlib
import json
import os
import socket
import tarfile
from pathlib import Path

MANIFEST_NAME = "manifest.json"
FORMAT = "t2f-shards"


def sha256_file(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_manifest(shards_dir) -> dict:
    """The manifest of a finished build; a clear error when there is none or it is unfinished."""
    path = Path(shards_dir) / MANIFEST_NAME
    build = f"run `t2f shards build --source ... --out {shards_dir}` (README, 'Real data')"
    if not path.is_file():
        raise FileNotFoundError(f"no shard manifest at {path}; {build}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); {build}") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a t2f shard manifest (format {manifest.get('format')!r})")
    if not manifest.get("complete"):
        raise ValueError(f"{path} is from an unfinished build; re-run the same build command to finish it")
    return manifest


def previous_entries(out_dir) -> dict:
    """{shard name: entry} from an earlier build in `out_dir`, finished or not ({} if none)."""
    path = Path(out_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return {e["name"]: e for split in manifest.get("splits", {}).values() for e in split.get("shards", [])}


def manifest_dict(head: dict, entries: dict, text_dim, complete: bool) -> dict:
    """Assemble the schema above from the build settings (`head`) and the shards written so far."""
    splits = {}
    for shard in head["plan"]:
        entry = entries.get(shard["name"])
        split = splits.setdefault(shard["split"], {"count": 0, "shards": []})
        if entry:
            split["count"] += entry["count"]
            split["shards"].append({k: entry[k] for k in ("name", "count", "sha256", "inputs", "skipped") if entry.get(k)})
    write_time = [b for e in entries.values() for b in e.get("skipped", [])]
    skipped = [{"id": b.id, "split": b.split, "reason": b.reason} for b in head["bad"]]
    skipped += [{"id": i, "split": split, "reason": reason} for i, reason, split in write_time]
    encoder = None
    if head["text_encoder"]:
        encoder = {"name": head["text_encoder"], "dim": text_dim, "dtype": "float16", "file": "text.npy"}
    return {"format": FORMAT, "builder_version": head["builder_version"], "complete": complete,
            "source": head["source"], "resolution": head["resolution"], "image_format": head["format"],
            "quality": head["quality"], "shard_size": head["shard_size"], "text_encoder": encoder,
            "attributes": head["attributes"], "vocab": head.get("vocab"), "options": head["options"],
            "splits": splits, "skipped": skipped}


def write_manifest(out_dir, manifest: dict) -> dict:
    """Atomic: a reader sees the old manifest or the new one, never half of one."""
    write_json_atomic(Path(out_dir) / MANIFEST_NAME, manifest)
    return manifest


def mark_unfinished(out_dir) -> None:
    """Turn a finished manifest in `out_dir` into an unfinished one (same entries), so no reader
    trusts its checksums while an array slice replaces shards; a no-op when there is none."""
    path = Path(out_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return
    if manifest.get("complete"):
        write_manifest(out_dir, dict(manifest, complete=False))


def write_json_atomic(path: Path, data) -> None:
    """Write under a name unique to this writer, then rename: concurrent array slices may
    rewrite the same file (mark_unfinished), and a shared temporary name would mix their bytes."""
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")  # (not mkstemp: it makes 0600 files)
    try:
        tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def verify_shards(out_dir, progress=True) -> list:
    """Problems found re-reading every shard the manifest lists (empty list = all good)."""
    from tqdm import tqdm

    out = Path(out_dir)
    manifest = read_manifest(out)
    problems = []
    if manifest.get("vocab") and not (out / manifest["vocab"]).is_file():
        problems.append(f"{out / manifest['vocab']}: vocabulary file missing")
    shards = [e for split in manifest["splits"].values() for e in split["shards"]]
    for entry in tqdm(shards, desc="verifying", unit="shard", disable=not progress):
        problems += _shard_problems(out / entry["name"], entry)
    return problems


def _shard_problems(path: Path, entry: dict) -> list:
    if not path.is_file():
        return [f"{path}: missing"]
    problems = []
    if sha256_file(path) != entry["sha256"]:
        problems.append(f"{path}: sha256 differs from the manifest (file changed or corrupt)")
    try:
        with tarfile.open(path) as tar:
            keys = {m.name.split(".", 1)[0] for m in tar.getmembers() if m.isfile()}
    except (tarfile.TarError, OSError) as err:
        return problems + [f"{path}: not a readable tar ({err})"]
    if len(keys) != entry["count"]:
        problems.append(f"{path}: {len(keys)} samples, manifest says {entry['count']}")
    return problems
