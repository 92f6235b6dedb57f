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
