"""Writing a shard build's files: shard tars (in a process pool), caption features, the vocabulary.

t2f/data/shards.py decides which shards to write; this module turns one planned shard (a list of
SampleSpecs) into `OUT/<split>-NNNNNN.tar`: written under a temporary name and renamed when
complete, with tar headers that carry no time stamps, so the same inputs give the same bytes.
"""

import base64
import io
import json
import os
from pathlib import Path

from t2f.data.manifest import sha256_file
from t2f.data.sources import tar_key

VOCAB_NAME = "vocab.json"


def text_settings(text_encoder):
    """What the caller asked the encoder for (name, pooling, max_length: None when it does not
    say), part of every shard's inputs: other settings give other features."""
    if text_encoder is None:
        return None
    return {"name": text_encoder.name, "pooling": getattr(text_encoder, "pooling", None),
            "max_length": getattr(text_encoder, "max_length", None)}


def describe_text_features(text_encoder, caption: str) -> dict:
    """{dim, probe}: the features of one caption of the set, which a trainer re-encodes with its own
    encoder to tell whether it would give the same features (t2f/data/manifest.py)."""
    row = text_encoder.encode([caption]).float().cpu().numpy().astype("<f2")[0]  # (D,)
    return {"dim": int(row.shape[0]), "probe": {"caption": caption, "float16": base64.b64encode(row.tobytes()).decode()}}


def encode_captions(text_encoder, todo, progress) -> dict:
    """{id: (n_captions, D) float16} for the shards to write, encoded once in this process."""
    if text_encoder is None:
        return {}
    from tqdm import tqdm

    specs = [s for shard in todo for s in shard["specs"]]
    features = {}
    for start in tqdm(range(0, len(specs), 64), desc="encoding captions", disable=not progress or not specs):
        chunk = specs[start:start + 64]
        flat = [c for s in chunk for c in s.captions]
        rows = text_encoder.encode(flat).float().cpu().numpy().astype("float16")  # (n, D)
        for s in chunk:
            features[s.id], rows = rows[:len(s.captions)], rows[len(s.captions):]
    return features


def write_shards(out, todo, features, head, skip_bad, workers, progress):
    """Write the planned shards in `todo` (in a pool when workers > 1), yielding one result per
    shard as it finishes: its manifest entry plus `failed` (True when an image failed to decode
    and skip_bad is off: then no file was written and `skipped` says which)."""
    from tqdm import tqdm

    tasks = [dict(out=str(out), name=s["name"], specs=s["specs"], resolution=head["resolution"], fmt=head["format"],
                  quality=head["quality"] or 95, features={x.id: features.get(x.id) for x in s["specs"]} if features else None,
                  skip_bad=skip_bad) for s in todo]
    inputs = {s["name"]: s["inputs"] for s in todo}
    bar = tqdm(total=sum(len(s["specs"]) for s in todo), desc="writing shards", unit="img", disable=not progress)
    for result in _imap(_write_shard, tasks, workers):
        bar.update(result.pop("attempted"))
        yield dict(result, inputs=inputs[result["name"]])
    bar.close()


def _imap(fn, tasks, workers):
    if workers <= 1 or len(tasks) <= 1:
        yield from map(fn, tasks)
        return
    with worker_pool(min(workers, len(tasks))) as pool:
        yield from pool.imap_unordered(fn, tasks)


def worker_pool(workers: int):
    """A process pool whose workers start from a clean forkserver, never forked from this process:
    a fork copies the locks other threads hold (an HTTP server, a process group's threads, W&B's),
    and a worker that inherits a held one waits forever while the pool waits for it."""
    import multiprocessing

    return multiprocessing.get_context("forkserver").Pool(workers)


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


def write_vocab(out: Path, good):
    """The recaptioner's vocabulary from the train captions only; its file name, or None."""
    from t2f.data.vocab import Vocab

    train = [c for s in good if s.split == "train" for c in s.captions]
    if not train:
        return None
    Vocab.build(train).save(out / VOCAB_NAME)
    return VOCAB_NAME
