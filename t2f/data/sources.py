"""Source readers: turn a dataset on disk into `SampleSpec`s for the shard writer, and check them.

    specs, bad, attribute_names = read_mmcelebahq("data/MM-CelebA-HQ")
    specs, bad, attribute_names = read_celebatext("data/CelebAText-HQ")
    specs, bad, attribute_names = read_jsonl("my_faces/manifest.jsonl")

A reader never raises for one broken sample: it returns the samples it could form plus a list of
`BadSample(id, reason)` (missing caption file, empty or non-UTF-8 captions, an id in a split file
with no image, ...). `check_samples` then checks what a reader cannot know cheaply (the image
opens, enough captions, attribute values), so the writer can refuse a bad dataset before writing
anything. Layouts are in METHOD.md ("Data"); every path that was tried is named when one is missing.
"""

import json
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")
CELEBA_CAPTIONS = 10  # both CelebA caption sets give every image 10 captions

# Where the pieces of each layout have been seen, relative to --root (first match wins).
MMCELEBAHQ_LAYOUT = {
    "images": ["CelebA-HQ-img", "CelebAMask-HQ/CelebA-HQ-img", "images", "img"],
    "captions": ["celeba-caption", "celeba-captions", "text", "captions"],
    "train": ["train/filenames.pickle", "filenames_train.pickle", "train_filenames.pickle"],
    "test": ["test/filenames.pickle", "filenames_test.pickle", "test_filenames.pickle"],
}
CELEBATEXT_LAYOUT = {
    "images": ["CelebAimg", "CelebA-img", "CelebA-HQ-img", "images"],
    "captions": ["captions", "celeba-caption", "text"],
    "train": ["data_flist/train.flist", "train.flist", "data_flist/train.txt"],
    "test": ["data_flist/test.flist", "test.flist", "data_flist/test.txt"],
}
ATTRIBUTE_FILES = ["CelebAMask-HQ-attribute-anno.txt", "CelebAMask-HQ/CelebAMask-HQ-attribute-anno.txt",
                   "CelebA-HQ-attribute-anno.txt"]


class SourceError(ValueError):
    """The dataset layout itself is wrong (a folder or split file is missing); names what was tried."""


@dataclass
class SampleSpec:
    """One image with its captions, as the shard writer wants it.

    `image` is a file path, a PIL image or an (H, W, 3) uint8 array. `attributes` maps attribute
    names to 0/1 (or ±1, converted by `check_samples`) when they are known.
    """

    id: str
    image: Any
    captions: list
    split: str = "train"
    attributes: Optional[dict] = None
    source: str = "custom"


@dataclass(frozen=True)
class BadSample:
    id: str
    reason: str
    split: str = ""


@dataclass
class SourceData:
    samples: list = field(default_factory=list)
    bad: list = field(default_factory=list)
    attribute_names: list = field(default_factory=list)


def id_sort_key(sample_id: str):
    """Numeric ids in numeric order, then the rest alphabetically: the order shards are cut in."""
    return (0, int(sample_id), "") if sample_id.isdigit() else (1, 0, sample_id)


# ---------------------------------------------------------------------------- the CelebA layouts


def read_mmcelebahq(root, limit: Optional[int] = None) -> SourceData:
    """Multi-Modal CelebA-HQ: id lists in pickles, 10 grammar captions per image, 40 attributes."""
    return _read_celeba_layout(Path(root), "mmcelebahq", MMCELEBAHQ_LAYOUT, _read_pickle_ids, limit)


def read_celebatext(root, limit: Optional[int] = None) -> SourceData:
    """CelebAText-HQ: id lists in .flist files, 10 human captions per image; attributes if the
    CelebAMask-HQ annotation file is put beside it."""
    return _read_celeba_layout(Path(root), "celebatext", CELEBATEXT_LAYOUT, _read_flist_ids, limit)


def _read_celeba_layout(root: Path, source: str, layout: dict, read_ids, limit) -> SourceData:
    if not root.is_dir():
        raise SourceError(f"--root {root} is not a directory")
    images = _index_images(_find(root, layout["images"], "image folder", source))
    captions_dir = _find(root, layout["captions"], "caption folder", source)
    attribute_names, attributes = _read_attributes(root)
    data = SourceData(attribute_names=attribute_names)
    seen = {}
    for split in ("train", "test"):
        split_file = _find(root, layout[split], f"{split} split file", source)
        ids = sorted(dict.fromkeys(read_ids(split_file)), key=id_sort_key)[:limit]
        for sample_id in ids:
            if sample_id in seen:
                data.bad.append(BadSample(sample_id, f"listed in both the {seen[sample_id]} and {split} split files", split))
                continue
            seen[sample_id] = split
            if sample_id not in images:
                where = split_file.relative_to(root)
                data.bad.append(BadSample(sample_id, f"listed in {where} but no image {sample_id}.* in {images.root}", split))
                continue
            caps, reason = read_caption_file(captions_dir / f"{sample_id}.txt")
            if reason:
                data.bad.append(BadSample(sample_id, reason, split))
                continue
            data.samples.append(SampleSpec(sample_id, images[sample_id], caps, split,
                                           attributes.get(sample_id), source))
    return data


class _ImageIndex(dict):
    """stem -> path of every image in one folder (one directory listing instead of 30 000 stats)."""

    root: Path


def _index_images(folder: Path) -> _ImageIndex:
    index = _ImageIndex()
    index.root = folder
    for entry in os.scandir(folder):
        stem, ext = os.path.splitext(entry.name)
        if ext.lower() in IMAGE_EXTS:
            index.setdefault(stem, folder / entry.name)
    return index


def _find(root: Path, candidates: list, what: str, source: str) -> Path:
    for rel in candidates:
        if (root / rel).exists():
            return root / rel
    tried = ", ".join(str(root / rel) for rel in candidates)
    raise SourceError(f"{source}: no {what} found under --root {root}; tried: {tried}")


def read_caption_file(path: Path):
    """(captions, None) or ([], reason): one caption per non-blank line, UTF-8 (a BOM is allowed)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return [], f"missing caption file {path}"
    except OSError as err:
        return [], f"unreadable caption file {path}: {err.strerror or err}"
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        return [], f"caption file {path} is not UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start})"
    # CelebAText-HQ's files carry runs of U+FFFD where the annotators' punctuation was lost
    captions = [" ".join(line.replace("\ufffd", " ").split()) for line in text.splitlines()]
    captions = [c for c in captions if c]
    if not captions:
        return [], f"empty caption file {path}"
    return captions, None


class _IdsOnly(pickle.Unpickler):
    """Split pickles hold plain lists of names; refusing every global keeps a hostile file inert."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"split file refers to {module}.{name}; only lists of names are accepted")


def _read_pickle_ids(path: Path) -> list:
    try:
        with open(path, "rb") as f:
            names = _IdsOnly(f, encoding="latin1").load()
    except Exception as err:
        raise SourceError(f"cannot read split file {path}: {err}") from None
    if not isinstance(names, (list, tuple)):
        raise SourceError(f"split file {path} holds a {type(names).__name__}, expected a list of image names")
    return [_name_to_id(n) for n in names]


def _read_flist_ids(path: Path) -> list:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise SourceError(f"cannot read split file {path}: {err}") from None
    return [_name_to_id(line.split()[0]) for line in lines if line.strip()]


def _name_to_id(name) -> str:
    """'12', 12, b'12', 'CelebA-HQ-img/12.jpg' -> '12'."""
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    base = os.path.basename(str(name).strip().replace("\\", "/"))
    stem, ext = os.path.splitext(base)
    return stem if ext.lower() in IMAGE_EXTS else base


def _read_attributes(root: Path):
    """CelebAMask-HQ-attribute-anno.txt: a count line, the 40 names, then '<file> ±1 ...' rows."""
    path = next((root / rel for rel in ATTRIBUTE_FILES if (root / rel).is_file()), None)
    if path is None:
        return [], {}
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    if len(lines) < 2:
        raise SourceError(f"attribute file {path} has no header lines")
    names = lines[1].split()
    table = {}
    for lineno, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != len(names) + 1:
            raise SourceError(f"{path}:{lineno}: expected a file name and {len(names)} values, got {len(parts)} fields")
        table[_name_to_id(parts[0])] = {n: int(int(v) > 0) for n, v in zip(names, parts[1:])}
    return names, table


# ---------------------------------------------------------------------------- jsonl


def read_jsonl(manifest, limit: Optional[int] = None) -> SourceData:
    """One JSON object per line: `image` (path, relative to the manifest's folder), `captions`
    (a list, or one string), optional `id` (default: the image's file stem), `split` (default
    "train") and `attributes` ({name: 0/1 or ±1}, the same names on every line)."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise SourceError(f"--manifest {manifest} is not a file")
    data = SourceData()
    per_split = {}
    for lineno, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        spec, reason = _jsonl_record(line, manifest.parent)
        if reason:
            data.bad.append(BadSample(f"line {lineno}", reason))
        else:
            per_split.setdefault(spec.split, []).append(spec)
    for specs in per_split.values():
        data.samples += sorted(specs, key=lambda s: id_sort_key(s.id))[:limit]
    named = next((s.attributes for s in data.samples if s.attributes), None)
    data.attribute_names = list(named) if named else []
    return data


def _jsonl_record(line: str, base: Path):
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return None, f"not valid JSON ({err.msg} at column {err.colno})"
    if not isinstance(record, dict) or "image" not in record:
        return None, "expected an object with at least 'image' and 'captions'"
    captions = record.get("captions", record.get("caption"))
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        return None, "'captions' must be a list of strings"
    image = base / str(record["image"])
    sample_id = str(record.get("id", _name_to_id(record["image"])))
    captions = [c.strip() for c in captions if c.strip()]
    return SampleSpec(sample_id, image, captions, str(record.get("split", "train")),
                      record.get("attributes"), "jsonl"), None


# ---------------------------------------------------------------------------- checks


def check_samples(specs, min_captions: int = 1, attribute_names=(), workers: int = 0, progress: bool = True):
    """Split `specs` into (good, bad): the image opens, ids are unique and usable as tar keys,
    enough captions, valid split name and attributes. Attributes are normalised to 0/1 in place."""
    good, bad, seen = [], [], set()
    for spec in specs:
        reason = _check_fields(spec, min_captions, attribute_names, seen)
        (bad.append(BadSample(spec.id, reason, spec.split)) if reason else good.append(spec))
    reasons = _map(check_image, [s.image for s in good], workers, progress, "checking images")
    bad += [BadSample(s.id, r, s.split) for s, r in zip(good, reasons) if r]
    return [s for s, r in zip(good, reasons) if not r], bad


def _check_fields(spec: SampleSpec, min_captions: int, attribute_names, seen: set) -> Optional[str]:
    key = tar_key(spec.id)
    if not key:
        return "empty id"
    if key in seen:
        return f"duplicate id (tar key {key!r} is already used)"
    seen.add(key)
    if not SPLIT_NAME.match(spec.split):
        return f"split name {spec.split!r} must be letters, digits or '_'"
    if not spec.captions:
        return "no captions"
    if len(spec.captions) < min_captions:
        return f"only {len(spec.captions)} captions, expected at least {min_captions}"
    if attribute_names:
        return _normalise_attributes(spec, attribute_names)
    return None


def _normalise_attributes(spec: SampleSpec, names) -> Optional[str]:
    if spec.attributes is None:
        return "no attributes, though the dataset has them (no row in the attribute file?)"
    if not isinstance(spec.attributes, dict) or set(spec.attributes) != set(names):
        return f"attribute names differ from the dataset's ({', '.join(list(names)[:5])}, ...)"
    values = {}
    for name in names:
        value = spec.attributes[name]
        if value not in (-1, 0, 1, True, False):
            return f"attribute {name!r} is {value!r}; use 0/1 or -1/1"
        values[name] = int(value > 0)
    spec.attributes = values
    return None


def tar_key(sample_id: str) -> str:
    """WebDataset splits a member name at its first '.', so ids become keys without dots or slashes."""
    return re.sub(r"[./\\\s]", "_", str(sample_id))


def check_image(image) -> Optional[str]:
    """None if `image` looks readable, else why not. Cheap: reads headers (and PNG checksums)."""
    if not isinstance(image, (str, os.PathLike)):
        return _check_in_memory(image)
    from PIL import Image, UnidentifiedImageError

    path = Path(image)
    if not path.is_file():
        return f"missing image {path}"
    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        return f"unreadable image {path}: {err}"
    return None


def _check_in_memory(image) -> Optional[str]:
    from PIL import Image

    if isinstance(image, Image.Image):
        return None
    shape = getattr(image, "shape", None)
    if shape is None or len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, 3, 4)):
        return f"image must be a path, a PIL image or an (H, W, 3) array, got {type(image).__name__} {shape}"
    return None


def _map(fn, items: list, workers: int, progress: bool, desc: str) -> list:
    """fn over items, in a process pool when workers > 1, with a progress bar."""
    from tqdm import tqdm

    bar = dict(total=len(items), desc=desc, disable=not progress or not items, unit="img")
    if workers <= 1 or len(items) < 64:
        return [fn(x) for x in tqdm(items, **bar)]
    from t2f.data.writer import worker_pool

    with worker_pool(workers) as pool:
        return list(tqdm(pool.imap(fn, items, chunksize=64), **bar))
