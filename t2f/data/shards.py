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
"""

import argparse
import hashlib
import io
import json
import os
import sys
from pathlib import Path

from t2f.data.manifest import (MANIFEST_NAME, manifest_dict, previous_entries, sha256_file, verify_shards,
                               write_manifest)
from t2f.data.sources import (BadSample, SourceError, check_samples, id_sort_key, read_celebatext, read_jsonl,
                              read_mmcelebahq, tar_key)

BUILDER_VERSION = 1
VOCAB_NAME = "vocab.json"
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
                 source="custom", bad=(), options=None, progress=True) -> dict:
    """Write the shards, vocabulary and manifest for `samples` (SampleSpecs); return the manifest.

    `bad` are samples a reader already rejected; `text_encoder` is any object with `.name` and
    `.encode(list[str]) -> (B, D) tensor`; `limit` keeps the first N ids of each split;
    `attribute_names` fixes the column order (default: the first labelled sample's keys).
    """
    if fmt not in ("png", "jpg"):
        raise ValueError(f"format must be 'png' or 'jpg', got {fmt!r}")
    samples = list(samples)
    if not attribute_names:  # the first labelled sample names them; the checks hold the rest to it
        attribute_names = next((list(s.attributes) for s in samples if s.attributes), [])
    good, bad = _validated(samples, bad, limit, min_captions, attribute_names, workers, progress, skip_bad)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"builder_version": BUILDER_VERSION, "resolution": resolution, "format": fmt,
                "quality": quality if fmt == "jpg" else None, "text_encoder": getattr(text_encoder, "name", None)}
    plan = _plan(good, shard_size, settings)
    previous = previous_entries(out)
    for stale in out.glob(".*.tar.tmp.*"):  # left by a build that crashed mid-shard
        stale.unlink()
    kept = {s["name"] for s in plan if _reusable(out, s, previous.get(s["name"]))}
    todo = [s for s in plan if s["name"] not in kept]
    entries = {name: previous[name] for name in kept}
    head = dict(settings, source=source, shard_size=shard_size, attributes=list(attribute_names),
                options=options or {}, bad=bad, plan=plan)
    write_manifest(out, manifest_dict(head, entries, None, complete=False))  # an older build is invalid from now
    features, text_dim = _encode_captions(text_encoder, todo, progress)
    failed = _write_all(out, todo, features, entries, head, text_dim, skip_bad, workers, progress)
    vocab_name = _write_vocab(out, good)
    if failed:
        raise BadInputError(failed, "their shards were not written; fix them, or pass --skip-bad")
    return write_manifest(out, manifest_dict(dict(head, vocab=vocab_name), entries, text_dim, complete=True))


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


def _reusable(out: Path, shard: dict, entry) -> bool:
    path = out / shard["name"]
    return bool(entry) and entry.get("inputs") == shard["inputs"] and path.is_file() and sha256_file(path) == entry["sha256"]


def _encode_captions(text_encoder, todo, progress):
    """{id: (n_captions, D) float16} for the shards to write, encoded once in this process."""
    if text_encoder is None:
        return {}, None
    from tqdm import tqdm

    specs = [s for shard in todo for s in shard["specs"]]
    features, dim = {}, getattr(text_encoder, "dim", None)
    for start in tqdm(range(0, len(specs), 64), desc="encoding captions", disable=not progress or not specs):
        chunk = specs[start:start + 64]
        flat = [c for s in chunk for c in s.captions]
        rows = text_encoder.encode(flat).float().cpu().numpy().astype("float16")  # (n, D)
        dim = rows.shape[1]
        for s in chunk:
            features[s.id], rows = rows[:len(s.captions)], rows[len(s.captions):]
    return features, dim


def _write_all(out, todo, features, entries, head, text_dim, skip_bad, workers, progress) -> list:
    """Write the shards in `todo` (in a pool when workers > 1); return write-time failures."""
    from tqdm import tqdm

    tasks = [dict(out=str(out), name=s["name"], specs=s["specs"], resolution=head["resolution"], fmt=head["format"],
                  quality=head["quality"] or 95, features={x.id: features.get(x.id) for x in s["specs"]} if features else None,
                  skip_bad=skip_bad) for s in todo]
    inputs = {s["name"]: s["inputs"] for s in todo}
    failed = []
    bar = tqdm(total=sum(len(s["specs"]) for s in todo), desc="writing shards", unit="img", disable=not progress)
    for result in _imap(_write_shard, tasks, workers):
        bar.update(result.pop("attempted"))
        if result.pop("failed"):
            failed += [BadSample(*b) for b in result["skipped"]]
            continue
        entries[result["name"]] = dict(result, inputs=inputs[result["name"]])
        write_manifest(out, manifest_dict(head, entries, text_dim, complete=False))
    bar.close()
    return failed


def _imap(fn, tasks, workers):
    if workers <= 1 or len(tasks) <= 1:
        yield from map(fn, tasks)
        return
    import multiprocessing

    with multiprocessing.get_context().Pool(min(workers, len(tasks))) as pool:
        yield from pool.imap_unordered(fn, tasks)


def _write_shard(task: dict) -> dict:
    """Pool worker: one shard to a temporary name, renamed when complete."""
    import tarfile

    final = Path(task["out"]) / task["name"]
    tmp = final.with_name(f".{final.name}.tmp.{os.getpid()}")
    skipped, count = [], 0
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        for spec in task["specs"]:
            try:
                image = encode_image(prepare_image(spec.image, task["resolution"]), task["fmt"], task["quality"])
            except Exception as err:  # a corrupt file can raise almost anything inside PIL
                skipped.append((spec.id, f"image could not be decoded: {err}", spec.split))
                continue
            key = tar_key(spec.id)
            meta = {"id": spec.id, "captions": spec.captions, "source": spec.source, "split": spec.split}
            if spec.attributes is not None:
                meta["attributes"] = spec.attributes
            _add_member(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode())
            _add_member(tar, f"{key}.{task['fmt']}", image)
            if task["features"] is not None:
                _add_member(tar, f"{key}.text.npy", _npy_bytes(task["features"][spec.id]))
            count += 1
    failed = bool(skipped) and not task["skip_bad"]
    if failed:
        tmp.unlink()
    else:
        os.replace(tmp, final)
    return {"name": final.name, "split": task["specs"][0].split, "count": count,
            "sha256": None if failed else sha256_file(final), "skipped": skipped, "failed": failed,
            "attempted": len(task["specs"])}


def prepare_image(image, resolution: int):
    """RGB, centre-cropped to a square, Lanczos-resized to resolution² (a PIL image)."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            im = im.convert("RGB")
    elif isinstance(image, Image.Image):
        im = image.convert("RGB")
    else:
        import numpy as np

        im = Image.fromarray(np.asarray(image, dtype=np.uint8).squeeze()).convert("RGB")
    side = min(im.size)
    if im.size[0] != im.size[1]:
        left, top = (im.size[0] - side) // 2, (im.size[1] - side) // 2
        im = im.crop((left, top, left + side, top + side))
    if side != resolution:
        im = im.resize((resolution, resolution), Image.LANCZOS)
    return im


def encode_image(im, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        im.save(buf, format="PNG")
    else:  # 4:4:4 chroma: subsampling would blur colour edges the FID features see
        im.save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def _npy_bytes(array) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _add_member(tar, name: str, data: bytes) -> None:
    import tarfile

    info = tarfile.TarInfo(name)  # mtime 0, uid/gid 0: the same inputs give the same bytes
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def _write_vocab(out: Path, good):
    from t2f.data.vocab import Vocab

    train = [c for s in good if s.split == "train" for c in s.captions]
    if not train:
        return None
    Vocab.build(train).save(out / VOCAB_NAME)
    return VOCAB_NAME


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
    data = readers[args.source](where, limit=args.limit)
    encoder = _text_encoder(args) if args.text_encoder else None
    min_captions = args.min_captions or (1 if args.source == "jsonl" else 10)
    options = {k: v for k, v in vars(args).items() if k not in ("action", "workers")}
    out = args.out or f"shards/{args.source}"
    manifest = build_shards(data.samples, out, resolution=args.resolution, fmt=args.format, quality=args.quality,
                            shard_size=args.shard_size, workers=args.workers, text_encoder=encoder, limit=args.limit,
                            skip_bad=args.skip_bad, min_captions=min_captions, attribute_names=data.attribute_names,
                            source=args.source, bad=data.bad, options=options)
    counts = ", ".join(f"{k}: {v['count']} in {len(v['shards'])} shards" for k, v in manifest["splits"].items())
    print(f"wrote {out}/{MANIFEST_NAME} ({counts}; {len(manifest['skipped'])} skipped)")
    return 0


def _text_encoder(args):
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
