"""What `t2f serve` does for one request, without the web page: check it, draw, read back, record.

    studio = Studio(load_pipeline("runs/demo"), time_limit=120)
    result = studio.draw("The woman has blond hair.", n=4, seed=0, truncation_psi=0.7, ca_noise=True)
    result.grid.save("grid.png"); result.settings["command"]    # the `t2f generate` line that draws them again

Faces come from `Pipeline.generate` and the reading from the same recaptioner call as `t2f
generate --read-back`, so a request gives exactly the images and the grid of its `command`
(same checkpoint, caption, seed, device). Bad input raises `RequestError` with a message for the
page; nothing here ends the server. A request that runs past `time_limit` seconds is stopped
between two layers of any model (forward pre-hooks: the computation itself is untouched) and
raises `TimeLimitExceeded`.
"""

import contextlib
import shlex
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from t2f.data.vocab import tokenize
from t2f.generate import TRUNCATION_RANGE, window_part
from t2f.visual import caption_grid, to_uint8

MAX_FACES = 16
MAX_CAPTION_CHARS = 2000  # far past any text encoder's window (CLIP reads 77 tokens), far below a pasted book
EXAMPLE_CAPTION = "The woman has blond hair and is smiling."


class RequestError(ValueError):
    """Bad input from the page or the API; the message is shown to the person as it is."""


class TimeLimitExceeded(RuntimeError):
    """The request ran past the server's time limit and was stopped."""


@dataclass
class Result:
    images: torch.Tensor  # (n, 3, H, W) in [-1, 1], on the CPU
    faces: list  # n (H, W, 3) uint8 arrays, what the page shows and the API returns
    readings: list  # n inference.Reading: the recaptioner's text, words and attention per face
    grid: object  # PIL image: what `t2f generate --read-back` writes for the same request
    settings: dict  # everything needed to draw the same faces again, with the command line
    notes: list = field(default_factory=list)  # things the person should know (caption cut, unknown words)


def check_caption(caption, vocab) -> tuple[str, list[str]]:
    """(the caption on one line, notes) or RequestError saying what is wrong with it and what to do."""
    if not isinstance(caption, str):
        raise RequestError(f"the caption must be text, got {type(caption).__name__}")
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError("the caption holds broken characters (lone surrogates: text that was not valid Unicode "
                           "where it was copied from); retype it") from None
    if "\ufffd" in caption:
        raise RequestError("the caption holds \ufffd (U+FFFD): text that was not valid UTF-8 where it was copied from "
                           "lost its letters there; retype the words that show it")
    controls = sorted({f"U+{ord(ch):04X}" for ch in caption if unicodedata.category(ch) == "Cc" and not ch.isspace()})
    if controls:
        raise RequestError(f"the caption holds control characters ({', '.join(controls[:5])}); remove them")
    caption = " ".join(caption.split())
    if not caption:
        raise RequestError(f"type a caption first: describe a face, e.g. “{EXAMPLE_CAPTION}”")
    if len(caption) > MAX_CAPTION_CHARS:
        raise RequestError(f"the caption is {len(caption):,} characters long; the limit is {MAX_CAPTION_CHARS:,} "
                           "(the text encoder reads only its first few dozen words): shorten it")
    words = [w for w in tokenize(caption) if any(ch.isalnum() for ch in w)]
    if not words:
        raise RequestError(f"the caption holds no words, only punctuation or symbols; describe a face, e.g. “{EXAMPLE_CAPTION}”")
    unknown = [w for w in dict.fromkeys(words) if w not in vocab.stoi]
    if len(unknown) == len(set(words)):
        raise RequestError(f"none of the caption's words ({_listing(unknown)}) occur in this model's training captions, "
                           f"so it cannot draw them; describe a face in its words, e.g. “{EXAMPLE_CAPTION}”")
    notes = [f"words this model never saw in training, which it may ignore: {_listing(unknown)}"] if unknown else []
    return caption, notes


def check_settings(n, seed, truncation_psi, ca_noise) -> tuple[int, int, float, bool]:
    """(n, seed, psi, ca_noise) as numbers, or RequestError naming the setting and its range."""
    if not _whole(n) or not 1 <= int(n) <= MAX_FACES:
        raise RequestError(f"the number of faces must be a whole number from 1 to {MAX_FACES}, got {n}")
    if not _whole(seed) or abs(int(seed)) >= 2**63:
        raise RequestError(f"the seed must be a whole number (e.g. 0), got {seed}")
    low, high = TRUNCATION_RANGE
    number = isinstance(truncation_psi, (int, float, np.integer, np.floating)) and not isinstance(truncation_psi, bool)
    if not (number and low <= float(truncation_psi) <= high):  # NaN fails both comparisons
        raise RequestError(f"truncation must be a number from {low:g} to {high:g} (1 = none, 0.7 is common), "
                           f"got {truncation_psi}")
    if not isinstance(ca_noise, bool):
        raise RequestError(f"CA noise must be true or false, got {ca_noise!r}")
    return int(n), int(seed), float(truncation_psi), ca_noise


class Studio:
    """One loaded pipeline and the server's settings; `draw` serves one request."""

    def __init__(self, pipeline, time_limit: float = 120.0, use_ema: bool = True, overrides=(), device: str = "cpu"):
        self.pipeline, self.time_limit = pipeline, time_limit
        self.use_ema, self.overrides, self.device = use_ema, list(overrides), device
        self.default_psi = float(pipeline.cfg.generator.truncation_psi)

    def draw(self, caption, n=4, seed=0, truncation_psi=None, ca_noise=True) -> Result:
        caption, notes = check_caption(caption, self.pipeline.vocab)
        psi = self.default_psi if truncation_psi is None else truncation_psi
        n, seed, psi, ca_noise = check_settings(n, seed, psi, ca_noise)
        shown = caption
        if self.pipeline.too_long([caption]):
            shown = window_part(self.pipeline, caption)
            notes.append(f"the caption is longer than the text encoder's window of {self.pipeline.text_encoder.max_length} "
                         "tokens: only its beginning is read (the grid shows that part)")
        with deadline(self._models(), self.time_limit):
            images = self.pipeline.generate([caption], n=n, seed=seed, truncation_psi=psi, ca_noise=ca_noise).cpu()
            readings = self.pipeline.read_back_with_attention(images)
        grid = caption_grid(images, [shown], per_row=n, subcaptions=[r.text for r in readings])
        settings = self.settings(caption, n, seed, psi, ca_noise, readings)
        return Result(images, list(to_uint8(images)), readings, grid, settings, notes)

    def settings(self, caption: str, n: int, seed: int, psi: float, ca_noise: bool, readings) -> dict:
        """The request as JSON: with `command`, `t2f generate` draws the same faces and grid."""
        ckpt = Path(self.pipeline.checkpoint).resolve() if self.pipeline.checkpoint else None
        args = ["t2f", "generate", "--ckpt", str(ckpt), "--n", str(n), "--seed", str(seed), "--truncation", repr(psi),
                "--device", self.device, "--read-back", "--out", "grid.png", "--attention", "attention.png"]
        args += [] if self.use_ema else ["--no-ema"]
        args += [] if ca_noise else ["--no-ca-noise"]
        args += [item for override in self.overrides for item in ("--set", override)]
        return {"caption": caption, "n": n, "seed": seed, "truncation_psi": psi, "ca_noise": ca_noise,
                "checkpoint": str(ckpt), "step": self.step, "ema": self.use_ema, "device": self.device,
                "overrides": self.overrides, "read_back": [r.text for r in readings],
                "command": shlex.join(args + ["--", caption])}

    @property
    def step(self):
        from t2f.checkpointing import read_state

        try:
            return read_state(self.pipeline.checkpoint).get("step")
        except (OSError, ValueError, TypeError):
            return None

    def _models(self) -> list:
        return [self.pipeline.text_encoder, self.pipeline.model, self.pipeline.generator]


@contextlib.contextmanager
def deadline(models, seconds: float):
    """Stop any forward call of `models` (or of their layers) once `seconds` have passed."""
    end = time.monotonic() + seconds

    def check(module, inputs):
        if time.monotonic() > end:
            raise TimeLimitExceeded(f"stopped after {seconds:g} s, the server's time limit for one request "
                                    "(t2f serve --time-limit); ask for fewer faces")

    handles = [m.register_forward_pre_hook(check) for model in models for m in model.modules()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def example_captions(pipeline, count: int = 6) -> list[str]:
    """Up to `count` different captions from the checkpoint's test split, in the split's order (an error
    when its shards are not on this machine: `t2f serve` then shows none)."""
    from t2f.data.loader import make_eval_loader

    cfg = pipeline.cfg
    loader = make_eval_loader(cfg.data.shards, cfg.data.eval_split, batch_size=4 * count, resolution=cfg.data.resolution,
                              vocab=pipeline.vocab)
    captions = next(iter(loader))["caption"]
    return list(dict.fromkeys(" ".join(c.split()) for c in captions))[:count]


def _whole(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    return bool(np.isfinite(value)) and float(value) == int(value)


def _listing(words: list[str], show: int = 5) -> str:
    shown = ", ".join(f"“{w}”" for w in words[:show])
    return shown + (f" and {len(words) - show} more" if len(words) > show else "")
