"""The shard manifest (`OUT/manifest.json`): its schema, reading, writing and `verify`.

    {
      "format": "t2f-shards", "builder_version": 1,
      "complete": true,                 # false while a build runs or after one failed
      "source": "mmcelebahq",           # mmcelebahq | celebatext | jsonl | custom (Python API)
      "resolution": 256, "image_format": "png", "quality": null,   # quality: JPEG only
      "shard_size": 1000,
      "text_encoder": null | {          # what made the <key>.text.npy features (see below)
          "name": "openai/clip-vit-base-patch32", "pooling": "auto", "max_length": 77,
          "dim": 512, "dtype": "float16", "file": "text.npy",
          "probe": {"caption": "...", "float16": "<base64>"}},
      "attributes": ["5_o_Clock_Shadow", ...],   # names, in column order; [] when unknown
      "vocab": "vocab.json",            # beside the manifest; built from train captions only
      "options": {...},                 # the build command's options, for the record; "eval_plugins":
                                        # modules that register this world's eval metrics (t2f eval imports them)
      "splits": {"train": {"count": 24000, "shards": [
          {"name": "train-000000.tar", "count": 1000, "sha256": "...", "inputs": "...",
           "skipped": [[id, reason, split], ...]}       # skipped: only when an image failed to decode
      ]}, "test": {...}},
      "skipped": [{"id": "123", "split": "train", "reason": "empty caption file ..."}]
    }

`inputs` fingerprints what a shard was made from (ids, captions, attributes, image files,
settings); a rebuild keeps a shard only if its inputs and its file's sha256 both still match.

The manifest is read, and shards verified, from a local folder or a URL (t2f/data/remote.py):
the manifest's shard names are joined to the same location.

`text_encoder` records the encoder as the build was given it (`pooling` "auto" resolves to "clip"
for CLIP models and "mean" otherwise; null where an API caller's encoder did not say) and `probe`,
the float16 features of the set's first caption. `check_text_features` holds a training config to
them: features from another encoder of the same width would otherwise train silently. Manifests
written before `pooling`, `max_length` and `probe` were recorded hold only the name.
"""

import base64
import hashlib
import json
import os
import socket
import tarfile
import warnings
from pathlib import Path

from t2f.data.remote import DEFAULT_REMOTE, RemoteError, is_remote, location_of, open_location, public, read_bytes

MANIFEST_NAME = "manifest.json"
FORMAT = "t2f-shards"


def sha256_file(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_manifest(shards_dir, remote=DEFAULT_REMOTE) -> dict:
    """The manifest of a finished build in a folder or at a URL; a clear error when there is none,
    it is unfinished, or a remote one cannot be read (RemoteError, after `remote.retries`)."""
    path = public(location_of(shards_dir, MANIFEST_NAME))
    build = f"run `t2f shards build --source ... --out {shards_dir}` (README, 'Real data')"
    if is_remote(shards_dir):
        build = f"build the shards with `t2f shards build --source ... --out DIR` and copy DIR to {public(shards_dir)}"
    elif not Path(path).is_file():
        raise FileNotFoundError(f"no shard manifest at {path}; {build}")
    try:
        manifest = json.loads(read_bytes(location_of(shards_dir, MANIFEST_NAME), remote).decode("utf-8"))
    except RemoteError as err:
        if err.missing:
            raise FileNotFoundError(f"no shard manifest at {path}; {build}") from None
        raise (ValueError(str(err)) if err.permanent else err) from None  # refused, unknown protocol: bad input
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); {build}") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a t2f shard manifest (format {manifest.get('format')!r})")
    if not manifest.get("complete"):
        raise ValueError(f"{path} is from an unfinished build; re-run the same build command to finish it")
    return manifest


class TextFeaturesMismatch(ValueError):
    """The shards' stored text features were made by another text encoder than the config's."""


PROBE_COSINE = 0.99  # fp16 storage and fp16/fp32 compute stay far above it; another model falls far below


def check_text_features(manifest: dict, text_cfg, use_precomputed: bool, encoder=None) -> None:
    """Refuse to train on stored text features that `text_cfg` (the config's `text` section) would
    not give: a TextFeaturesMismatch naming both encoders and the fix. Nothing to check when the
    shards hold no features or the run does not use them (`use_precomputed=False`).

    With `encoder` (the run's own text encoder, any object with `.encode`) and a manifest that has
    a probe, the probe caption is re-encoded: the same weights under another name (a hub id at
    build time, a local folder on the cluster) pass, another model fails whatever its name.
    Otherwise the names are compared. Pooling and max_length are compared where both sides state
    them ("auto" pooling is compared through the probe only). Manifests from before the record
    (name only, no probe) are checked by name and pass with a warning: refusing them would force a
    rebuild of every existing set, although only a different encoder name is a likely mistake.
    """
    stored = manifest.get("text_encoder")
    if not use_precomputed or not stored:
        return
    pooling = getattr(encoder, "pooling", None) or text_cfg.pooling
    probe = stored.get("probe")
    if encoder is not None and probe:
        same_model = _probe_agrees(probe, encoder)
    else:
        same_model = _same_name(stored["name"], text_cfg.encoder)
    differs = (not same_model
               or _both_differ(stored.get("pooling"), pooling, skip="auto")
               or _both_differ(stored.get("max_length"), text_cfg.max_length))
    if differs:
        raise TextFeaturesMismatch(_mismatch_message(stored, text_cfg, pooling))
    if not probe and stored.get("max_length") is None:
        warnings.warn(f"the shard manifest records only the name of the text encoder behind its features "
                      f"({stored['name']!r}), so pooling and max_length cannot be checked against text.*; "
                      f"rebuilding the shards records them", stacklevel=2)


def _same_name(a: str, b: str) -> bool:
    return str(a).rstrip("/") == str(b).rstrip("/")


def _both_differ(stored, wanted, skip=None) -> bool:
    known = stored is not None and wanted is not None and skip not in (stored, wanted)
    return known and stored != wanted


def _probe_agrees(probe: dict, encoder) -> bool:
    import numpy as np

    stored = np.frombuffer(base64.b64decode(probe["float16"]), dtype="<f2").astype(np.float32)  # (D,)
    fresh = encoder.encode([probe["caption"]]).float().cpu().numpy()[0]  # (D,)
    if fresh.shape != stored.shape:
        return False
    if np.allclose(fresh, stored, rtol=1e-2, atol=1e-3):
        return True
    norms = float(np.linalg.norm(fresh) * np.linalg.norm(stored))
    return norms > 0 and float(fresh @ stored) / norms >= PROBE_COSINE


def _mismatch_message(stored: dict, text_cfg, pooling) -> str:
    def encoder(name, pool, length):
        return f"{name!r} (pooling {pool or '?'}, max_length {length or '?'})"

    options = f"--text-encoder {text_cfg.encoder} --text-pooling {text_cfg.pooling} --text-max-length {text_cfg.max_length}"
    return (f"the text features stored in the shards (data.shards) were made by "
            f"{encoder(stored['name'], stored.get('pooling'), stored.get('max_length'))}, but text.* asks for "
            f"{encoder(text_cfg.encoder, pooling, text_cfg.max_length)}; rebuild the shards with "
            f"`t2f shards build ... {options}`, or set data.use_precomputed_text=false to encode the captions while training")


def previous_entries(out_dir) -> dict:
    """{shard name: entry} from an earlier build in `out_dir`, finished or not ({} if none)."""
    path = Path(out_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return {e["name"]: e for split in manifest.get("splits", {}).values() for e in split.get("shards", [])}


def manifest_dict(head: dict, entries: dict, text, complete: bool) -> dict:
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
    if head["text_encoder"]:  # `text` is {dim, probe}; None only if no slice recorded it
        text = text or {"dim": None, "probe": None}
        encoder = dict(head["text_encoder"], dim=text["dim"], dtype="float16", file="text.npy", probe=text["probe"])
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


def verify_shards(out_dir, progress=True, remote=DEFAULT_REMOTE) -> list:
    """Problems found re-reading every shard the manifest lists (empty list = all good); every
    shard of a remote set is downloaded once, streamed through sha256 and a tar reader."""
    from tqdm import tqdm

    manifest = read_manifest(out_dir, remote)
    problems = []
    if manifest.get("vocab"):
        problems += _file_problems(location_of(out_dir, manifest["vocab"]), "vocabulary file", remote)
    shards = [e for split in manifest["splits"].values() for e in split["shards"]]
    for entry in tqdm(shards, desc="verifying", unit="shard", disable=not progress):
        problems += _shard_problems(location_of(out_dir, entry["name"]), entry, remote)
    return problems


def _file_problems(where, what, remote) -> list:
    if not is_remote(where):
        return [] if Path(where).is_file() else [f"{where}: {what} missing"]
    try:
        read_bytes(where, remote)
    except RemoteError as err:
        return [f"{err}" + (f" ({what} missing)" if err.missing else "")]
    return []


def _shard_problems(where, entry: dict, remote) -> list:
    name = public(where)
    if not is_remote(where) and not Path(where).is_file():
        return [f"{name}: missing"]
    digest, keys = hashlib.sha256(), set()
    try:
        with open_location(where, remote) as stream:
            reader = _Hashing(stream, digest)
            try:
                with tarfile.open(fileobj=reader, mode="r|*") as tar:
                    keys = {m.name.split(".", 1)[0] for m in tar if m.isfile()}
                unreadable = None
            except tarfile.TarError as err:
                unreadable = f"{name}: not a readable tar ({err})"
            reader.drain()  # the sha256 covers every byte, also those after the tar's end marker
    except RemoteError as err:
        return [f"{err}" + (" (missing)" if err.missing else "")]
    problems = [] if digest.hexdigest() == entry["sha256"] else [f"{name}: sha256 differs from the manifest "
                                                                 "(file changed or corrupt)"]
    if unreadable:
        return problems + [unreadable]
    if len(keys) != entry["count"]:
        problems.append(f"{name}: {len(keys)} samples, manifest says {entry['count']}")
    return problems


class _Hashing:
    """A read-only stream that feeds every byte it passes on into `digest` (one pass: hash and tar)."""

    def __init__(self, stream, digest):
        self.stream, self.digest = stream, digest

    def read(self, size=-1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass
