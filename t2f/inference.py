"""Text -> faces with a trained checkpoint: the pipeline that `t2f generate` and `t2f eval` use.

    pipe = load_pipeline("runs/mmcelebahq", device="cuda")          # a run dir or a checkpoint dir
    images = pipe.generate(["a smiling woman with blond hair"], n=4, seed=0, truncation_psi=0.7)
    pipe.read_back(images)                                           # what the recaptioner reads
    pipe.read_back_with_attention(images)[0].attention               # where it looked, word by word

`Pipeline.from_parts(...)` wraps models that are already in memory: the trainer's sample grids and
periodic evaluation go through the same `generate`, so a grid at step N is what `t2f generate
--ckpt .../step-N --seed train.seed` draws. `build_models` is the one place the frozen text
encoder, the generator and the TextToFace of a config are built, for training and inference alike.

A checkpoint with an EMA of the text path (`ema.safetensors`, `train.ema_decay` > 0) generates
with the EMA unless `use_ema=False`.

Determinism: every image has its own CA noise, drawn from a torch.Generator seeded by a hash of
(seed, which caption, which sample), so an image does not depend on the other captions in the
call or on the batch it was made in; synthesis runs with constant noise. On CUDA the generator's
fp16 layers run in fp16 (as in training); on CPU everything runs in fp32.
"""

import hashlib
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from t2f.checkpointing import WEIGHTS, resolve_checkpoint
from t2f.tokens import UNK

EMA_WEIGHTS = "ema.safetensors"  # written by the trainer beside WEIGHTS when it keeps an EMA


class PipelineError(RuntimeError):
    """A checkpoint or one of the models it names could not be loaded; the message says which."""


class Reading(NamedTuple):
    """What the recaptioner reads from one image: the caption, its words, and for each word the
    attention over the image's feature grid, a (len(words), L) tensor whose rows sum to 1."""

    text: str
    words: list[str]
    attention: torch.Tensor


def sample_seed(*parts) -> int:
    """A 63-bit seed from any printable parts: stable across processes, platforms and runs."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()
    return int(digest[:15], 16)


def _unwrap(model):
    return getattr(model, "module", model)  # DDP / DeepSpeed engines keep the model in .module


class Pipeline:
    """Frozen text encoder + TextToFace (eval) + frozen generator + vocabulary, on one device."""

    def __init__(self, cfg, model, generator, text_encoder, vocab, checkpoint=None):
        self.cfg, self.model, self.generator = cfg, _unwrap(model), generator
        self.text_encoder, self.vocab, self.checkpoint = text_encoder, vocab, checkpoint
        self.device = next(self.generator.parameters()).device

    @classmethod
    def from_parts(cls, cfg, model, generator, text_encoder, vocab) -> "Pipeline":
        """A pipeline over models already in memory (nothing is copied or reloaded)."""
        return cls(cfg, model, generator, text_encoder, vocab)

    @property
    def resolution(self) -> int:
        return int(self.generator.img_resolution)

    # -- text

    def too_long(self, captions: list[str]) -> list[int]:
        """Indices of captions longer than the text encoder's window (they are truncated)."""
        tokenizer, window = self.text_encoder.tokenizer, self.text_encoder.max_length
        lengths = [len(ids) for ids in tokenizer(list(captions), truncation=False)["input_ids"]]
        return [i for i, n in enumerate(lengths) if n > window]

    @torch.no_grad()
    def encode(self, captions: list[str]) -> torch.Tensor:
        return self.text_encoder.encode(list(captions)).to(self.device, torch.float32)  # (B, S)

    # -- latents and images

    @torch.no_grad()
    def latents(self, s: torch.Tensor, seeds: list[int], truncation_psi: float = 1.0, ca_noise: bool = True) -> torch.Tensor:
        """Text features (B, S) -> ws (B, num_ws, w_dim); row i's CA noise comes from seeds[i].

        Without `ca_noise` z is the CA mean μ(s): every sample of a caption is the same face.
        """
        rows = []
        for row, seed in zip(s, seeds):  # one call per row: an image never depends on its batch
            gen = torch.Generator(self.device).manual_seed(int(seed))
            ws, *_ = self.model.latents(row[None], deterministic=not ca_noise, truncation_psi=truncation_psi, generator=gen)
            rows.append(ws)  # (1, num_ws, w_dim)
        return torch.cat(rows)  # (B, num_ws, w_dim)

    @torch.no_grad()
    def synthesize(self, ws: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """ws (B, num_ws, w_dim) -> images (B, 3, H, W) float32 in [-1, 1], on the pipeline's device."""
        chunks = [self.generator.synthesis(w.float(), noise_mode="const") for w in ws.split(batch_size)]
        return torch.cat(chunks).float().clamp(-1, 1)  # (B, 3, H, W)

    def generate(self, captions: list[str], n: int = 1, seed: int = 0, truncation_psi: float | None = None,
                 batch_size: int = 16, ca_noise: bool = True) -> torch.Tensor:
        """(len(captions) * n, 3, H, W) in [-1, 1], caption-major: n samples of caption 0 first.
        truncation_psi None is the checkpoint's generator.truncation_psi, as `t2f generate` and `t2f serve` use."""
        if isinstance(captions, str):
            raise TypeError("generate() takes a list of captions, not one string")
        if not captions or n < 1:
            raise ValueError(f"need at least one caption and n >= 1 (got {len(captions)} captions, n={n})")
        s = self.encode(captions).repeat_interleave(n, dim=0)  # (C*n, S)
        seeds = [sample_seed(seed, j, k) for j in range(len(captions)) for k in range(n)]
        psi = self.cfg.generator.truncation_psi if truncation_psi is None else truncation_psi
        return self.synthesize(self.latents(s, seeds, psi, ca_noise), batch_size)

    # -- reading back

    @torch.no_grad()
    def read_back(self, images: torch.Tensor, max_len: int | None = None) -> list[str]:
        """Greedy captions the recaptioner reads from [-1, 1] images."""
        max_len = max_len or self.cfg.data.max_caption_tokens
        ids = self.model.recaptioner.greedy(images.to(self.device).float(), max_len=max_len)
        return [self.vocab.decode(row) for row in ids]

    @torch.no_grad()
    def read_back_with_attention(self, images: torch.Tensor, max_len: int | None = None) -> list[Reading]:
        """`read_back`, with the words one by one and where the recaptioner looked for each."""
        max_len = max_len or self.cfg.data.max_caption_tokens
        ids, alphas = self.model.recaptioner.greedy(images.to(self.device).float(), max_len=max_len, return_attention=True)
        unknown = self.vocab.itos[UNK]
        return [Reading(self.vocab.decode(row), [self.vocab.itos[i] if 0 <= i < len(self.vocab) else unknown for i in row],
                        alpha) for row, alpha in zip(ids, alphas)]


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bicubic resize of [-1, 1] images to size x size (a no-op when they already are)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


def load_pipeline(run_or_ckpt, device="cpu", overrides=(), use_ema=True) -> Pipeline:
    """Everything needed to generate from a run or checkpoint directory.

    `overrides` are dotted config overrides applied to the checkpoint's config, e.g. a local
    path for the text encoder or the generator weights on another machine. The text path's EMA
    replaces the trained CA head and mapper when the checkpoint has one and `use_ema` is true.
    """
    from t2f.config import ConfigError, load_config
    from t2f.data.vocab import Vocab

    ckpt = resolve_checkpoint(run_or_ckpt)  # CheckpointNotFound names what it looked for
    try:
        cfg = load_config(str(ckpt / "config.yaml"), list(overrides))
    except ConfigError as err:
        raise PipelineError(f"{ckpt}: its config.yaml cannot be used: {err}") from None
    state = _read_weights(ckpt / WEIGHTS)
    if use_ema and (ckpt / EMA_WEIGHTS).is_file():
        state.update(_read_weights(ckpt / EMA_WEIGHTS))  # ca.* and mapping.* only
    try:
        vocab = Vocab.load(ckpt / "vocab.json")
    except (OSError, ValueError) as err:
        raise PipelineError(f"{ckpt}: {err}") from None
    if not cfg.generator.checkpoint:
        warnings.warn(f"{ckpt}: trained with a randomly initialised generator (generator.checkpoint is empty), "
                      "which checkpoints do not store; this one is a new random generator, so images will not "
                      "match training. Override generator.checkpoint=FILE with the generator it was trained with.", stacklevel=2)
    text_encoder, generator, model = build_models(cfg, len(vocab), device)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise PipelineError(f"{ckpt / WEIGHTS} does not match the model its config.yaml describes: "
                            f"{str(err).splitlines()[0]} ...") from None
    return Pipeline(cfg, model.requires_grad_(False).eval(), generator, text_encoder, vocab, checkpoint=Path(ckpt))


def _read_weights(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise PipelineError(f"{path} is not a readable safetensors file ({err}); "
                            "point --ckpt at a checkpoint written by `t2f train`") from None


def build_models(cfg, vocab_size: int, device):
    """(frozen text encoder, frozen generator, TextToFace) for `cfg`; the TextToFace is trainable."""
    from t2f.models.generator import generator_from_config
    from t2f.models.text_encoder import TextEncoder
    from t2f.models.text_to_face import build_text_to_face

    text_encoder = TextEncoder(cfg.text.encoder, cfg.text.pooling, cfg.text.max_length, cfg.text.local_files_only,
                               device=device)
    generator = generator_from_config(cfg.generator, device=device).requires_grad_(False).eval()
    model = build_text_to_face(cfg, text_encoder.dim, generator, vocab_size).to(device)
    return text_encoder, generator, model
