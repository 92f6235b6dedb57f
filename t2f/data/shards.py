"""WebDataset shard builder: `build_shards(samples, out_dir, ...)` writes shards, vocabulary, manifest.

The `t2f shards build|verify` command line is t2f/shards_cli.py (it builds the text encoder; this
module only takes one, as any object with `.name` and `.encode(list[str]) -> (B, D) tensor`, and
optionally `.pooling` and `.max_length`, which the manifest records). Python API (what the toy
world calls; images may be paths, PIL images or uint8 arrays):

    from t2f.data.shards import build_shards
    from t2f.data.sources import SampleSpec
    manifest = build_shards([SampleSpec("0", img, ["a smiling man."], "train", {"Smiling": 1})],
                            "shards/toy", resolution=64, fmt="png", shard_size=500, workers=2)

Output: `OUT/<split>-000000.tar ...`; each sample is `<key>.json` (id, captions, attributes when
known, source, split), `<key>.png|jpg` (square, `resolution`², Lanczos) and, with a text encoder,
`<key>.text.npy` (float16, one row per caption). `OUT/manifest.json` lists every shard with its
sample count and sha256, and which encoder made the text features (schema in t2f/data/manifest.py);
`OUT/vocab.json` is the recaptioner's vocabulary built from the train captions only.

Each shard is a fixed slice of the sorted ids of its split, written under a temporary name by a
pool worker and renamed when complete; tar headers carry no time stamps, so a rebuild is
byte-identical. The manifest is rewritten after every shard (`"complete": false` until the end),
so re-running after a crash or after deleting a shard rewrites only the shards whose file is
missing or whose checksum or inputs changed. Bad input is refused before anything is written
(unless skip_bad); an image that passes the header check but fails to decode is found while
writing: its shard is not written and the build ends with the same kind of error.

Array jobs split the writing: `num_slices=N, slice_index=I` writes every N-th shard,
`num_slices=N, finalize=True` writes the manifest from the slices' records (t2f/data/slices.py,
slurm/shards.sbatch).
"""

import hashlib
import json
import os
from pathlib import Path

from t2f.data.manifest import manifest_dict, mark_unfinished, previous_entries, sha256_file, write_manifest
from t2f.data.slices import check_slice_args, collect_slices, recorded_entries, remove_records, slice_of, write_record
from t2f.data.sources import BadSample, check_samples, id_sort_key
from t2f.data.writer import describe_text_features, encode_captions, text_settings, write_shards, write_vocab

BUILDER_VERSION = 1
SHOW_BAD = 40  # bad ids listed in an error before "... and N more"


class BadInputError(ValueError):
    """Some samples are unusable; the message lists them with reasons."""

    def __init__(self, bad, hint="fix them, or pass --skip-bad to leave them out (they are recorded in the manifest)"):
        self.bad = list(bad)
        lines = [f"  {b.id}{f' ({b.split})' if b.split else ''}: {b.reason}" for b in self.bad[:SHOW_BAD]]
        if len(self.bad) > SHOW_BAD:
            lines.append(f"  ... and {len(self.bad) - SHOW_BAD} more")
        super().__init__(f"{len(self.bad)} bad sample(s); {hint}:\n" + "\n".join(lines))


def build_shards(samples, out_dir, *, resolution=256, fmt="png", quality=95, shard_size=250, workers=0,
                 text_encoder=None, limit=None, skip_bad=False, min_captions=1, attribute_names=(),
                 source="custom", bad=(), options=None, num_slices=None, slice_index=None, finalize=False,
                 progress=True) -> dict:
    """Write the shards, vocabulary and manifest for `samples` (SampleSpecs); return the manifest.

    `bad` are samples a reader already rejected; `text_encoder` is any object with `.name` and
    `.encode(list[str]) -> (B, D) tensor` (and `.pooling`, `.max_length` when it has them: they
    are recorded, so a trainer can tell whether its own encoder would give the same features);
    `limit` keeps the first N ids of each split; `attribute_names` fixes the column order (default:
    the first labelled sample's keys). Array jobs (t2f/data/slices.py): with `num_slices`,
    `slice_index=I` writes only slice I's shards and returns its record; `finalize=True` writes the
    manifest and vocabulary from the records of all slices (the text encoder is not called then:
    its `.name`, `.pooling` and `.max_length` are enough).
    """
    check_slice_args(num_slices, slice_index, finalize)
    if fmt not in ("png", "jpg"):
        raise ValueError(f"format must be 'png' or 'jpg', got {fmt!r}")
    samples = list(samples)
    if not attribute_names:  # the first labelled sample names them; the checks hold the rest to it
        attribute_names = next((list(s.attributes) for s in samples if s.attributes), [])
    good, bad = _validated(samples, bad, limit, min_captions, attribute_names, workers, progress, skip_bad)
    settings = {"builder_version": BUILDER_VERSION, "resolution": resolution, "format": fmt,
                "quality": quality if fmt == "jpg" else None, "text_encoder": text_settings(text_encoder)}
    head = dict(settings, source=source, shard_size=shard_size, attributes=list(attribute_names),
                options=options or {}, bad=bad, plan=_plan(good, shard_size, settings))
    out = Path(out_dir)
    if finalize:
        entries, text = collect_slices(out, head["plan"], num_slices)
        return _finish(out, head, good, entries, text)
    # Before anything is written: an encoder that cannot load fails here, and every slice
    # describes the features by the same caption (the first of the plan).
    text = describe_text_features(text_encoder, head["plan"][0]["specs"][0].captions[0]) if text_encoder else None
    out.mkdir(parents=True, exist_ok=True)
    sliced = slice_index is not None
    mine = slice_of(head["plan"], slice_index, num_slices) if sliced else head["plan"]
    _remove_stale_temps(out, mine if sliced else None)
    previous = {**previous_entries(out), **recorded_entries(out)}
    entries = {s["name"]: previous[s["name"]] for s in mine if _reusable(out, s, previous.get(s["name"]))}
    todo = [s for s in mine if s["name"] not in entries]

    def save(complete=False):  # after every shard, so a re-run keeps what is done
        if sliced:
            return write_record(out, slice_index, num_slices, mine, entries, text, complete)
        return write_manifest(out, manifest_dict(head, entries, text, complete))

    if sliced and todo:
        mark_unfinished(out)  # an older manifest must not vouch for shards this slice replaces
    save()  # without a slice: an older build is invalid from now
    features = encode_captions(text_encoder, todo, progress)
    failed = []
    for result in write_shards(out, todo, features, head, skip_bad, workers, progress):
        if result.pop("failed"):
            failed += [BadSample(*b) for b in result["skipped"]]
            continue
        entries[result["name"]] = result
        save()
    record = save(complete=not failed) if sliced else None
    if failed:
        raise BadInputError(failed, "their shards were not written; fix them, or pass --skip-bad")
    return record if sliced else _finish(out, head, good, entries, text)


def _finish(out: Path, head: dict, good, entries: dict, text) -> dict:
    """The finished manifest; slice records are superseded by it."""
    manifest = write_manifest(out, manifest_dict(dict(head, vocab=write_vocab(out, good)), entries, text, complete=True))
    remove_records(out)
    return manifest


def _validated(samples, bad, limit, min_captions, attribute_names, workers, progress, skip_bad):
    per_split = {}
    for spec in samples:
        per_split.setdefault(spec.split, []).append(spec)
    specs = [s for split in sorted(per_split) for s in sorted(per_split[split], key=lambda s: id_sort_key(s.id))[:limit]]
    good, found = check_samples(specs, min_captions, attribute_names, workers, progress)
    bad = list(bad) + found
    if bad and not skip_bad:
        raise BadInputError(bad)
    if not good:
        raise BadInputError(bad, "no usable samples are left") if bad else ValueError("no samples to write")
    return good, bad


def _plan(good, shard_size: int, settings: dict) -> list:
    """Cut each split's sorted samples into shards; `inputs` fingerprints what a shard is made of."""
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1, got {shard_size}")
    plan = []
    for split in sorted({s.split for s in good}):
        specs = [s for s in good if s.split == split]
        for index, start in enumerate(range(0, len(specs), shard_size)):
            part = specs[start:start + shard_size]
            plan.append({"name": f"{split}-{index:06d}.tar", "split": split, "specs": part,
                         "inputs": _inputs_digest(part, settings)})
    return plan


def _inputs_digest(specs, settings: dict) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for s in specs:
        record = [s.id, s.captions, s.attributes, s.split, s.source, _image_fingerprint(s.image)]
        digest.update(json.dumps(record, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _image_fingerprint(image):
    if isinstance(image, (str, os.PathLike)):
        return [str(image), os.path.getsize(image)]
    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(np.asarray(image)).tobytes()).hexdigest()


def _remove_stale_temps(out: Path, shards) -> None:
    """Temporary files left by a build that crashed mid-shard: all of them, or only those of
    `shards` (other slices of an array job may be writing theirs right now)."""
    patterns = [".*.tar.tmp.*"] if shards is None else [f".{s['name']}.tmp.*" for s in shards]
    for pattern in patterns:
        for stale in out.glob(pattern):
            stale.unlink(missing_ok=True)


def _reusable(out: Path, shard: dict, entry) -> bool:
    path = out / shard["name"]
    return bool(entry) and entry.get("inputs") == shard["inputs"] and path.is_file() and sha256_file(path) == entry["sha256"]
