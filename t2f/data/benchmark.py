"""`t2f bench data`: samples/s of the WebDataset loader against a plain Dataset over the source folder.

    t2f bench data                                   # synthetic CelebA-HQ-like JPEGs (1024², q95)
    t2f bench data --source-dir data/MM-CelebA-HQ/CelebA-HQ-img --count 2000 --workers 8

Both pipelines deliver the same thing, (B, 3, 256, 256) float tensors in [-1, 1] in shuffled
batches of 32, with the same number of DataLoader workers, in the same run; each is timed over
full passes (worker start-up included), best of `--repeats`. The shard build is timed as well,
since the loader's speed is paid for once there (decode + resize of the source images).
"""

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from t2f.data.sources import IMAGE_EXTS, SampleSpec


class FolderImages(torch.utils.data.Dataset):
    """The plain baseline: open the source file, resize to the training resolution, scale to [-1, 1]."""

    def __init__(self, paths, resolution: int):
        self.paths, self.resolution = list(paths), resolution

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        with Image.open(self.paths[index]) as im:
            im = im.convert("RGB").resize((self.resolution, self.resolution), Image.LANCZOS)
        pixels = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)
        return pixels.float() / 127.5 - 1.0


def synthetic_faces(folder: Path, count: int, size: int, seed: int = 0) -> list:
    """Smooth colour fields plus grain, saved as JPEG q95: about the size and decode cost of CelebA-HQ."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    paths = []
    for i in range(count):
        a, b, c = rng.uniform(0, 6, 3)
        base = np.stack([np.sin(a * xx + b * yy), np.cos(b * xx - c * yy), np.sin(c * (xx + yy))], -1)  # (H, W, 3)
        pixels = np.clip(127 + 100 * base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
        paths.append(folder / f"{i}.jpg")
        Image.fromarray(pixels).save(paths[-1], quality=95)
    return paths


def _time_passes(make_iter, repeats: int):
    best, count = math.inf, 0
    for _ in range(repeats):
        start, count = time.perf_counter(), 0
        for batch in make_iter():
            count += len(batch["image"]) if isinstance(batch, dict) else len(batch)
        best = min(best, time.perf_counter() - start)
    return count / best, count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="t2f bench data", description=__doc__.split("\n")[0])
    parser.add_argument("--source-dir", help="folder of source images (default: synthetic CelebA-HQ-like JPEGs)")
    parser.add_argument("--count", type=int, default=256, help="images to use")
    parser.add_argument("--source-size", type=int, default=1024, help="side of the synthetic source images")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers, the same for both")
    parser.add_argument("--format", default="png", choices=["png", "jpg"], help="shard image format")
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    from t2f.data.loader import make_train_loader
    from t2f.data.shards import build_shards
    from t2f.data.vocab import Vocab

    with tempfile.TemporaryDirectory(prefix="t2f-bench-data-") as tmp:
        tmp = Path(tmp)
        if args.source_dir:
            paths = sorted(p for p in Path(args.source_dir).iterdir() if p.suffix.lower() in IMAGE_EXTS)[: args.count]
        else:
            paths = synthetic_faces(tmp / "source", args.count, args.source_size)
        if not paths:
            print(f"t2f bench data: no images in {args.source_dir}")
            return 1
        specs = [SampleSpec(str(i), p, ["a face."], "train") for i, p in enumerate(paths)]
        start = time.perf_counter()
        build_shards(specs, tmp / "shards", resolution=args.resolution, fmt=args.format, shard_size=args.shard_size,
                     workers=args.workers, progress=False)
        build_s = time.perf_counter() - start

        loader = make_train_loader(tmp / "shards", "train", batch_size=args.batch_size, resolution=args.resolution,
                                   vocab=Vocab.build(["a face."]), num_workers=args.workers,
                                   resampled=len(specs) < args.shard_size * max(1, args.workers))
        plain = torch.utils.data.DataLoader(FolderImages(paths, args.resolution), batch_size=args.batch_size,
                                            shuffle=True, drop_last=True, num_workers=args.workers)
        shards_rate, shards_n = _time_passes(lambda: iter(loader), args.repeats)
        plain_rate, plain_n = _time_passes(lambda: iter(plain), args.repeats)

    source = args.source_dir or f"synthetic {args.source_size}² JPEG q95"
    print(f"{len(paths)} images ({source}) -> {args.resolution}², batch {args.batch_size}, {args.workers} workers, "
          f"torch {torch.__version__}; best of {args.repeats} passes")
    print("| pipeline | samples/s | samples per pass |\n|---|---:|---:|")
    print(f"| plain Dataset + DataLoader over the source files | {plain_rate:.1f} | {plain_n} |")
    print(f"| WebDataset shards ({args.format} {args.resolution}²) via make_train_loader | {shards_rate:.1f} | {shards_n} |")
    print(f"\nloader / plain: {shards_rate / plain_rate:.2f}x   (one-off shard build: {build_s:.1f} s, "
          f"{len(paths) / build_s:.1f} images/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
