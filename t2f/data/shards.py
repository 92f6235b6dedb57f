"""WebDataset shard writer, its manifest, and the `t2f shards build|verify` command.

Command line (see the README, "Real data"):

    t2f shards build --source mmcelebahq --root data/MM-CelebA-HQ --out shards/mmcelebahq
    t2f shards build --source celebatext --root data/CelebAText-HQ --out shards/celebatext
    t2f shards build --source jsonl --manifest faces.jsonl --out shards/faces --skip-bad
    t2f shards verify shards/mmcelebahq

Python API (what the toy world calls; images may be paths, PIL images or uint8 arrays):

    from t2f.data.shards import build_shards
    from t2f.data.sources import SampleSpec
    manifest = build_shards([SampleSpec("0", img, ["a smiling man."], "train", {"Smiling": 1})],
                            "shards/toy", resolution=64, fmt="png", shard_size=500, workers=2)

Output: `OUT/<split>-000000.tar ...`; each sample is `<key>.json` (id, captions, attributes when
known, source, split), `<key>.png|jpg` (square, `resolution`², Lanczos) and, with a text encoder,
`<key>.text.npy` (float16, one row per caption). `OUT/manifest.json` lists every shard with its
sample count and sha256 (schema in t2f/data/manifest.py), `OUT/vocab.json` is the recaptioner's
vocabulary built from the train captions only.

Each shard is a fixed slice of the sorted ids of its split, written under a temporary name by a
pool worker and renamed when complete; tar headers carry no time stamps, so a rebuild is
byte-identical. The manifest is rewritten after every shard (`"complete": false` until the end),
so re-running after a crash or after deleting a shard rewrites only the shards whose file is
missing or whose checksum or inputs changed. Bad input is refused before anything is written
(unless --skip-bad); an image that passes the header check but fails to decode is found while
writing: its shard is not written and the build ends with the same kind of error.

Array jobs split the writing: `--num-slices N --slice I` writes every N-th shard, `--num-slices N
--finalize` writes the manifest from the slices' records (t2f/data/slices.py, slurm/shards.sbatch).
"""

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

from t2f.data.manifest import (MANIFEST_NAME, manifest_dict, mark_unfinished, previous_entries, sha256_file,
                               verify_shards, write_manifest)
from t2f.data.slices import (check_slice_args, collect_slices, recorded_entries, remove_records, slice_of,
                             write_record)
from t2f.data.sources import (BadSample, SourceError, check_samples, id_sort_key, read_celebatext, read_jsonl,
                              read_mmcelebahq)
from t2f.data.writer import encode_captions, write_shards, write_vocab

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
    `.encode(list[str]) -> (B, D) tensor`; `limit` keeps the first N ids of each split;
    `attribute_names` fixes the column order (default: the first labelled sample's keys).
    Array jobs (t2f/data/slices.py): with `num_slices`, `slice_index=I` writes only slice I's
    shards and returns its record; `finalize=True` writes the manifest and vocabulary from the
    records of all slices (the text encoder is not called then: its `.name` is enough).
    """
    check_slice_args(num_slices, slice_index, finalize)
    if fmt not in ("png", "jpg"):
        raise ValueError(f"format must be 'png' or 'jpg', got {fmt!r}")
    samples = list(samples)
    if not attribute_names:  # the first labelled sample names them; the checks hold the rest to it
        attribute_names = next((list(s.attributes) for s in samples if s.attributes), [])
    good, bad = _validated(samples, bad, limit, min_captions, attribute_names, workers, progress, skip_bad)
    settings = {"builder_version": BUILDER_VERSION, "resolution": resolution, "format": fmt,
                "quality": quality if fmt == "jpg" else None, "text_encoder": getattr(text_encoder, "name", None)}
    head = dict(settings, source=source, shard_size=shard_size, attributes=list(attribute_names),
                options=options or {}, bad=bad, plan=_plan(good, shard_size, settings))
    out = Path(out_dir)
    if finalize:
        entries, text_dim = collect_slices(out, head["plan"], num_slices)
        return _finish(out, head, good, entries, text_dim)
    out.mkdir(parents=True, exist_ok=True)
    sliced = slice_index is not None
    mine = slice_of(head["plan"], slice_index, num_slices) if sliced else head["plan"]
    _remove_stale_temps(out, mine if sliced else None)
    previous = {**previous_entries(out), **recorded_entries(out)}
    entries = {s["name"]: previous[s["name"]] for s in mine if _reusable(out, s, previous.get(s["name"]))}
    todo = [s for s in mine if s["name"] not in entries]

    def save(text_dim, complete=False):  # after every shard, so a re-run keeps what is done
        if sliced:
            return write_record(out, slice_index, num_slices, mine, entries, text_dim, complete)
        return write_manifest(out, manifest_dict(head, entries, text_dim, complete))

    if sliced and todo:
        mark_unfinished(out)  # an older manifest must not vouch for shards this slice replaces
    save(None)  # without a slice: an older build is invalid from now
    features, text_dim = encode_captions(text_encoder, todo, progress)
    failed = []
    for result in write_shards(out, todo, features, head, skip_bad, workers, progress):
        if result.pop("failed"):
            failed += [BadSample(*b) for b in result["skipped"]]
            continue
        entries[result["name"]] = result
        save(text_dim)
    record = save(text_dim, complete=not failed) if sliced else None
    if failed:
        raise BadInputError(failed, "their shards were not written; fix them, or pass --skip-bad")
    return record if sliced else _finish(out, head, good, entries, text_dim)


def _finish(out: Path, head: dict, good, entries: dict, text_dim) -> dict:
    """The finished manifest; slice records are superseded by it."""
    manifest = write_manifest(out, manifest_dict(dict(head, vocab=write_vocab(out, good)), entries, text_dim, complete=True))
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


# ---------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t2f shards", description="Build or verify WebDataset shards.")
    sub = parser.add_subparsers(dest="action", required=True)
    build = sub.add_parser("build", help="write shards + manifest.json + vocab.json from a dataset")
    build.add_argument("--source", required=True, choices=["mmcelebahq", "celebatext", "jsonl"])
    build.add_argument("--root", help="dataset folder (mmcelebahq, celebatext)")
    build.add_argument("--manifest", help="jsonl file, one {image, captions, split?, attributes?} per line")
    build.add_argument("--out", help="output folder (default shards/<source>)")
    build.add_argument("--resolution", type=int, default=256, help="square side in pixels, Lanczos resize (default %(default)s)")
    build.add_argument("--format", default="png", choices=["png", "jpg"],
                       help="png is lossless; jpg is several times smaller, but JPEG artefacts alter FID against the real images (default %(default)s)")
    build.add_argument("--quality", type=int, default=95, help="JPEG quality, jpg only (default %(default)s)")
    build.add_argument("--shard-size", type=int, default=250,
                       help="samples per shard; a training run needs at least ranks x loader workers shards per split (default %(default)s)")
    build.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="processes writing shards (default %(default)s)")
    build.add_argument("--limit", type=int, help="keep only the first N ids of each split (quick subsets)")
    build.add_argument("--min-captions", type=int, help="fewer captions is bad input (default 10 for the CelebA sets, 1 for jsonl)")
    build.add_argument("--skip-bad", action="store_true", help="leave bad samples out and record them in the manifest")
    build.add_argument("--text-encoder", help="also store frozen text features (hub id or local folder), fp16")
    build.add_argument("--text-device", default="cpu", help="device for --text-encoder (cpu, cuda)")
    build.add_argument("--local-files-only", action="store_true", help="never download the text encoder")
    build.add_argument("--num-slices", type=int, help="array jobs (slurm/shards.sbatch): split the shards into N slices")
    step = build.add_mutually_exclusive_group()
    step.add_argument("--slice", type=int, help="write only slice I of N (shards whose index %% N == I); no manifest")
    step.add_argument("--finalize", action="store_true", help="once all N slices are done: check them, write the manifest")
    verify = sub.add_parser("verify", help="re-check every shard's sample count and sha256 against manifest.json")
    verify.add_argument("out", help="shard folder holding manifest.json")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _build(args) if args.action == "build" else _verify(args)
    except (SourceError, BadInputError, FileNotFoundError, ValueError) as err:
        print(f"t2f shards {args.action}: {err}", file=sys.stderr)
        return 1


def _build(args) -> int:
    readers = {"mmcelebahq": read_mmcelebahq, "celebatext": read_celebatext, "jsonl": read_jsonl}
    where = args.manifest if args.source == "jsonl" else args.root
    if not where:
        raise SourceError(f"--source {args.source} needs {'--manifest FILE' if args.source == 'jsonl' else '--root DIR'}")
    check_slice_args(args.num_slices, args.slice, args.finalize)
    data = readers[args.source](where, limit=args.limit)
    encoder = _text_encoder(args) if args.text_encoder else None
    min_captions = args.min_captions or (1 if args.source == "jsonl" else 10)
    # the options of the equivalent local build, so an array job's manifest is the same
    options = {k: v for k, v in vars(args).items() if k not in ("action", "workers", "num_slices", "slice", "finalize")}
    out = args.out or f"shards/{args.source}"
    manifest = build_shards(data.samples, out, resolution=args.resolution, fmt=args.format, quality=args.quality,
                            shard_size=args.shard_size, workers=args.workers, text_encoder=encoder, limit=args.limit,
                            skip_bad=args.skip_bad, min_captions=min_captions, attribute_names=data.attribute_names,
                            source=args.source, bad=data.bad, options=options, num_slices=args.num_slices,
                            slice_index=args.slice, finalize=args.finalize)
    if args.slice is not None:
        print(f"wrote slice {args.slice} of {args.num_slices} ({len(manifest['shards'])} shards) in {out}; "
              f"when every slice is done: the same command with --num-slices {args.num_slices} --finalize")
        return 0
    counts = ", ".join(f"{k}: {v['count']} in {len(v['shards'])} shards" for k, v in manifest["splits"].items())
    print(f"wrote {out}/{MANIFEST_NAME} ({counts}; {len(manifest['skipped'])} skipped)")
    return 0


def _text_encoder(args):
    if args.finalize:  # the manifest needs only its name (the slices stored the features)
        from types import SimpleNamespace

        return SimpleNamespace(name=args.text_encoder)
    import torch

    from t2f.models.text_encoder import TextEncoder

    dtype = torch.float16 if args.text_device.startswith("cuda") else torch.float32
    return TextEncoder(args.text_encoder, local_files_only=args.local_files_only, device=args.text_device, dtype=dtype)


def _verify(args) -> int:
    problems = verify_shards(args.out)
    for line in problems:
        print(line, file=sys.stderr)
    print(f"{args.out}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0
