"""The `t2f shards build|verify` command: shards from a dataset on disk (see the README, "Real data").

    t2f shards build --source mmcelebahq --root data/MM-CelebA-HQ --out shards/mmcelebahq
    t2f shards build --source celebatext --root data/CelebAText-HQ --out shards/celebatext
    t2f shards build --source jsonl --manifest faces.jsonl --out shards/faces --skip-bad
    t2f shards build ... --text-encoder openai/clip-vit-base-patch32 --text-device cuda   # + fp16 features
    t2f shards verify shards/mmcelebahq
    t2f shards verify s3://bucket/shards/mmcelebahq      # or https://..., gs://..., 'pipe:CMD {name}'

The builder itself is t2f/data/shards.py; it sits below the models and takes the text encoder as
an object, so this entry point builds it (t2f/models/text_encoder.py). Exit status: 0 done,
2 bad input (a missing folder or manifest, bad samples, wrong options, a URL the server refuses;
one message, no traceback), 1 failed (`verify` found problems, a server could not be reached, or
array slices did not finish before --finalize).
"""

import argparse
import os
import sys

from t2f.data.manifest import MANIFEST_NAME, verify_shards
from t2f.data.remote import RemoteOptions, public
from t2f.data.shards import build_shards
from t2f.data.slices import SliceError, check_slice_args
from t2f.data.sources import read_celebatext, read_jsonl, read_mmcelebahq

BAD_INPUT = 2
READERS = {"mmcelebahq": read_mmcelebahq, "celebatext": read_celebatext, "jsonl": read_jsonl}


class EncoderUnavailable(ValueError):
    """--text-encoder names a model that cannot be loaded; the message says how to stage it."""


class TextEncoderOptions:
    """The --text-* options as the builder's text encoder. The model loads on the first `encode`:
    `--finalize` only records the options (the slices stored the features) and never loads it."""

    def __init__(self, args):
        self.name, self.pooling, self.max_length = args.text_encoder, args.text_pooling, args.text_max_length
        self.device, self.local_files_only = args.text_device, args.local_files_only
        self.model = None

    def encode(self, captions):
        if self.model is None:
            import torch

            from t2f.models.text_encoder import TextEncoder, TextEncoderError

            dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
            try:
                self.model = TextEncoder(self.name, self.pooling, self.max_length, self.local_files_only,
                                         device=self.device, dtype=dtype)
            except TextEncoderError as err:
                raise EncoderUnavailable(f"--text-encoder: {err}") from None
        return self.model.encode(captions)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t2f shards", description="Build or verify WebDataset shards.")
    sub = parser.add_subparsers(dest="action", required=True)
    build = sub.add_parser("build", help="write shards + manifest.json + vocab.json from a dataset")
    build.add_argument("--source", required=True, choices=sorted(READERS))
    build.add_argument("--root", help="dataset folder (mmcelebahq, celebatext)")
    build.add_argument("--manifest", help="jsonl file, one {image, captions, split?, attributes?} per line")
    build.add_argument("--out", help="output folder (default shards/<source>)")
    build.add_argument("--resolution", type=int, default=256, help="square side in pixels, Lanczos resize (default %(default)s)")
    build.add_argument("--format", default="png", choices=["png", "jpg"],
                       help="png is lossless; jpg is several times smaller, "
                            "but JPEG artefacts alter FID against the real images (default %(default)s)")
    build.add_argument("--quality", type=int, default=95, help="JPEG quality, jpg only (default %(default)s)")
    build.add_argument("--shard-size", type=int, default=250,
                       help="samples per shard; a training run needs at least ranks x loader workers shards per split "
                            "(default %(default)s)")
    build.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                       help="processes writing shards (default %(default)s)")
    build.add_argument("--limit", type=int, help="keep only the first N ids of each split (quick subsets)")
    build.add_argument("--min-captions", type=int,
                       help="fewer captions is bad input (default 10 for the CelebA sets, 1 for jsonl)")
    build.add_argument("--skip-bad", action="store_true", help="leave bad samples out and record them in the manifest")
    build.add_argument("--text-encoder", help="also store frozen text features (hub id or local folder), fp16; "
                                              "train with the same text.encoder, text.pooling and text.max_length")
    build.add_argument("--text-pooling", default="auto", choices=["auto", "clip", "mean"],
                       help="as text.pooling: CLIP's projected embeds or masked mean pooling (default %(default)s)")
    build.add_argument("--text-max-length", type=int, default=77,
                       help="as text.max_length: tokens per caption (default %(default)s)")
    build.add_argument("--text-device", default="cpu", help="device for --text-encoder (cpu, cuda)")
    build.add_argument("--local-files-only", action="store_true", help="never download the text encoder")
    build.add_argument("--num-slices", type=int, help="array jobs (slurm/shards.sbatch): split the shards into N slices")
    step = build.add_mutually_exclusive_group()
    step.add_argument("--slice", type=int, help="write only slice I of N (shards whose index %% N == I); no manifest")
    step.add_argument("--finalize", action="store_true", help="once all N slices are done: check them, write the manifest")
    verify = sub.add_parser("verify", help="re-check every shard's sample count and sha256 against manifest.json")
    verify.add_argument("out", help="shard folder or URL holding manifest.json: https://..., s3://..., gs://..., "
                                    "or 'pipe:COMMAND' with {name} where the file name goes")
    verify.add_argument("--retries", type=int, default=3, help="reopens of a remote file after a failure (default %(default)s)")
    verify.add_argument("--timeout", type=float, default=60.0,
                        help="http(s): seconds without a byte before a read fails (default %(default)s)")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)  # wrong options: argparse prints usage and exits 2
    try:
        return _build(args) if args.action == "build" else _verify(args)
    except SliceError as err:  # a step of the array job failed, not the input
        print(f"t2f shards {args.action}: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as err:
        # SourceError, BadInputError, EncoderUnavailable, a missing manifest, an --out that cannot be written
        print(f"t2f shards {args.action}: {err}", file=sys.stderr)
        return BAD_INPUT
    except OSError as err:  # a remote manifest that could not be read after the retries (t2f/data/remote.py)
        print(f"t2f shards {args.action}: {err}", file=sys.stderr)
        return 1


def _build(args) -> int:
    where = args.manifest if args.source == "jsonl" else args.root
    if not where:
        raise ValueError(f"--source {args.source} needs {'--manifest FILE' if args.source == 'jsonl' else '--root DIR'}")
    check_slice_args(args.num_slices, args.slice, args.finalize)
    if args.text_max_length < 1:
        raise ValueError(f"--text-max-length must be at least 1, got {args.text_max_length}")
    data = READERS[args.source](where, limit=args.limit)
    encoder = TextEncoderOptions(args) if args.text_encoder else None
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


def _verify(args) -> int:
    if args.retries < 0 or not args.timeout > 0:
        raise ValueError(f"--retries must be 0 or more and --timeout above 0, got {args.retries} and {args.timeout}")
    problems = verify_shards(args.out, remote=RemoteOptions(retries=args.retries, timeout=args.timeout))
    for line in problems:
        print(line, file=sys.stderr)
    print(f"{public(args.out)}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0
