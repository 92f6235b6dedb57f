"""`t2f generate`: faces from captions with a trained checkpoint, as a captioned grid or single PNGs.

    t2f generate --ckpt runs/mmcelebahq "a smiling woman with blond hair" "a man with a beard" \\
        --n 4 --seed 0 --truncation 0.7 --out grid.png
    t2f generate --ckpt runs/toy --captions captions.txt --out-dir faces/ --device cpu
    t2f generate --ckpt runs/demo "the woman has blond hair ." --attention attention.png

One row per caption, `--n` samples in it, the caption written under the row (`--read-back` adds
what the recaptioner reads from each image; `--attention FILE` draws where it looked for each word
it read from the first image, t2f/attention.py). The same checkpoint, captions, seed and device
give the same bytes; `t2f serve` draws through the same code, and its settings JSON holds the
command that gives its faces again. Bad input (an empty caption, a missing or foreign checkpoint,
an output path that cannot be written, a truncation psi outside [0, 2] or NaN) is reported in one
line on stderr with exit status 2. A caption longer than the text encoder's window is cut to the part the encoder
reads, with a warning, and drawn (and listed in captions.tsv) cut, ending in "…".
"""

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

import torch

# psi = 0 gives the average face, 1 no truncation; StyleGAN users stay in [0.5, 1] and go up to
# about 2 for extra variety. Negative psi mirrors w through the average (faces opposite to what the
# caption asks for) and larger values give artefacts; NaN gives black images.
TRUNCATION_RANGE = (0.0, 2.0)


class UsageError(ValueError):
    """Bad command-line input; the message is shown as it is."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t2f generate", description=__doc__.split("\n\n")[0])
    p.add_argument("captions", nargs="*", help="captions (quote each one)")
    p.add_argument("--ckpt", required=True, help="run directory (its latest checkpoint) or checkpoint directory")
    p.add_argument("--captions", dest="captions_file", help="text file with one caption per line (blank lines ignored)")
    p.add_argument("--n", type=int, default=4, help="images per caption (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--truncation", type=float, default=None,
                   help="truncation psi towards the average w, from 0 (average face) to 2 (1 = none); "
                        "default: the checkpoint's generator.truncation_psi, as in its sample grids")
    p.add_argument("--no-ema", action="store_true",
                   help="draw with the trained CA head and mapper even when the checkpoint keeps their EMA")
    p.add_argument("--no-ca-noise", action="store_true",
                   help="use the CA mean instead of sampling around it: every sample of a caption is the same face")
    p.add_argument("--out", help="grid PNG path (default grid.png unless --out-dir is given)")
    p.add_argument("--out-dir", help="also write one PNG per image into this folder")
    p.add_argument("--read-back", action="store_true", help="write the recaptioner's reading under each image")
    p.add_argument("--attention", metavar="FILE",
                   help="also write the recaptioner's attention for each word it reads from the first image (PNG)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override the checkpoint's config, e.g. --set text.encoder=/models/clip (repeatable)")
    return p


def read_captions(args) -> list[str]:
    captions = list(args.captions)
    for i, caption in enumerate(captions, 1):
        if not caption.strip():
            raise UsageError(f"caption {i} is empty; give non-empty captions in quotes")
    if args.captions_file:
        path = Path(args.captions_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(f"cannot read captions file {path}: {err}") from None
        from_file = [line.strip() for line in lines if line.strip()]
        if not from_file:
            raise UsageError(f"captions file {path} holds no caption (one per line)")
        captions += from_file
    if not captions:
        raise UsageError('no captions: give them as arguments ("a smiling woman") or with --captions FILE')
    return [c.strip() for c in captions]


def check_outputs(args) -> tuple[Path | None, Path | None]:
    """(grid path, folder) after checking both can be written, before any model is loaded."""
    grid = Path(args.out) if args.out else (None if args.out_dir else Path("grid.png"))
    for flag, path, example in (("--out", grid, "grid.png"),
                                ("--attention", Path(args.attention) if args.attention else None, "attention.png")):
        if path is not None:
            check_writable_file(flag, path, example)
    folder = Path(args.out_dir) if args.out_dir else None
    if folder is not None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"cannot create --out-dir {folder}: {err.strerror or err}") from None
        if not _can_write_into(folder):
            raise UsageError(f"cannot write into --out-dir {folder}: permission denied")
    return grid, folder


def check_writable_file(flag: str, path: Path, example: str) -> None:
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; give a file name such as {path / example}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"cannot write {path}: folder {parent} does not exist")
    if not _can_write_into(parent) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"cannot write {path}: permission denied")


def _can_write_into(folder: Path) -> bool:
    """Try it: permission bits do not tell the whole story (root, read-only mounts, ACLs)."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".t2f-write-test-")
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def resolve_device(choice: str) -> str:
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but CUDA is not available here; use --device cpu")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def check_truncation(psi: float) -> float:
    """psi itself when it is a usable truncation (see TRUNCATION_RANGE), else a UsageError."""
    low, high = TRUNCATION_RANGE
    if not (math.isfinite(psi) and low <= psi <= high):  # NaN fails every comparison: say so explicitly
        raise UsageError(f"--truncation must be a number from {low:g} to {high:g} (1 = none, 0.7 is common), got {psi}")
    return psi


def cut_to_window(pipeline, captions: list[str]) -> list[str]:
    """Captions as the text encoder reads them: a too-long one is cut to its window, with a warning."""
    captions = list(captions)
    for i in pipeline.too_long(captions):
        captions[i] = window_part(pipeline, captions[i])
        print(f"t2f generate: warning: caption {i + 1} is longer than the text encoder's window of "
              f"{pipeline.text_encoder.max_length} tokens; only its beginning is used (and drawn): {captions[i][:60]!r}",
              file=sys.stderr)
    return captions


def window_part(pipeline, caption: str) -> str:
    """The part of a too-long caption that the text encoder reads, ending in " …" (as drawn)."""
    encoder = pipeline.text_encoder
    return _read_part(encoder.tokenizer, caption, encoder.max_length).rstrip() + " …"


def _read_part(tokenizer, caption: str, window: int) -> str:
    """The beginning of `caption` that fits in `window` tokens (special tokens included)."""
    try:  # fast tokenizers say where each token came from
        spans = tokenizer(caption, truncation=True, max_length=window, return_offsets_mapping=True)["offset_mapping"]
        return caption[:max(end for _, end in spans)]
    except NotImplementedError:  # slow (Python) tokenizers: the decoded tokens, possibly normalised
        ids = tokenizer(caption, truncation=True, max_length=window)["input_ids"]
        return tokenizer.decode(ids, skip_special_tokens=True)


def write_images(images, captions, n: int, grid: Path | None, folder: Path | None, subcaptions=None) -> None:
    from PIL import Image

    from t2f.visual import caption_grid, to_uint8

    try:
        if grid is not None:
            caption_grid(images, captions, per_row=n, subcaptions=subcaptions).save(grid)
            print(f"wrote {grid}")
        if folder is not None:
            pixels = to_uint8(images)  # (N, H, W, 3)
            lines = []
            for index, image in enumerate(pixels):
                name = f"caption{index // n:03d}_sample{index % n:02d}.png"
                Image.fromarray(image).save(folder / name)
                lines.append(f"{name}\t{captions[index // n]}")
            (folder / "captions.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
            print(f"wrote {len(pixels)} images and captions.tsv to {folder}")
    except OSError as err:
        raise UsageError(f"cannot write output: {err}") from None


def write_attention(pipeline, image, path: Path) -> None:
    """The show-attend-tell figure of `image` (3, H, W): where the recaptioner looked for each word."""
    from t2f.attention import attention_figure

    reading = pipeline.read_back_with_attention(image[None])[0]
    try:
        attention_figure(image, reading.words, reading.attention).save(path)
    except OSError as err:
        raise UsageError(f"cannot write --attention {path}: {err}") from None
    print(f"wrote {path} (attention for: {reading.text or 'no words'})")


def main(argv=None) -> int:
    from t2f.checkpointing import CheckpointNotFound
    from t2f.config import ConfigError
    from t2f.inference import PipelineError, load_pipeline
    from t2f.models.text_encoder import TextEncoderError
    from t2f.models.weights import CheckpointError

    args = _parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.n < 1:
            raise UsageError(f"--n must be at least 1, got {args.n}")
        if args.truncation is not None:
            check_truncation(args.truncation)
        captions = read_captions(args)
        grid, folder = check_outputs(args)
        pipeline = load_pipeline(args.ckpt, device=resolve_device(args.device), overrides=args.set, use_ema=not args.no_ema)
        psi = check_truncation(pipeline.cfg.generator.truncation_psi if args.truncation is None else args.truncation)
        shown = cut_to_window(pipeline, captions)
        images = pipeline.generate(captions, n=args.n, seed=args.seed, truncation_psi=psi,
                                   ca_noise=not args.no_ca_noise).cpu()
        subcaptions = pipeline.read_back(images) if args.read_back else None
        write_images(images, shown, args.n, grid, folder, subcaptions)
        if args.attention:
            write_attention(pipeline, images[0], Path(args.attention))
    except (UsageError, CheckpointNotFound, PipelineError, ConfigError, TextEncoderError, CheckpointError,
            FileNotFoundError) as err:  # FileNotFoundError: weights a config names (messages say which)
        print(f"t2f generate: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
