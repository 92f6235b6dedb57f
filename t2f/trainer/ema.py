"""Exponential moving average of the text path (CA head + mapper): DiT's `update_ema`, StyleGAN's G_ema.

    ema = TextPathEMA(model, decay=0.9999)     # copies of model.ca and model.mapping
    ema = make_ema(cfg, model, resumed_from)   # the same, or None when train.ema_decay is 0
    ema.update(model)                          # after every optimiser step
    ema.as_model(model)                        # the model with the EMA's text path, for sampling

Generation, evaluation and sample grids use the EMA when a run keeps one (`train.ema_decay` > 0).
Only the text path is averaged: it is what turns a caption into a face; the recaptioner is a
training signal and is used as trained. The EMA lives on every rank (each holds the same
replicated weights under DDP and ZeRO-2, so each computes the same average); the main process
saves it as `ema.safetensors` in each checkpoint, and a resume loads it back exactly.
"""

import copy
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


class TextPathEMA:
    def __init__(self, model, decay: float):
        assert 0.0 < decay < 1.0, f"train.ema_decay must be in (0, 1) to keep an EMA, got {decay}"
        self.decay = decay
        self.ca = copy.deepcopy(model.ca).float().requires_grad_(False).eval()  # fp32 even under DeepSpeed fp16
        self.mapping = copy.deepcopy(model.mapping).float().requires_grad_(False).eval()

    def _pairs(self, model):
        for ema, live in ((self.ca, model.ca), (self.mapping, model.mapping)):
            yield from zip(ema.parameters(), live.parameters())

    @torch.no_grad()
    def update(self, model) -> None:
        for ema, live in self._pairs(model):
            ema.lerp_(live.detach().to(ema.dtype), 1.0 - self.decay)

    def as_model(self, model):
        """`model` (unwrapped) with the averaged CA head and mapper in place of the live ones."""
        return model.with_text_path(self.ca, self.mapping)

    def state_dict(self) -> dict:
        """Keys as in t2f.safetensors (`ca.*`, `mapping.*`), so the EMA loads onto a TextToFace."""
        state = {f"ca.{k}": v for k, v in self.ca.state_dict().items()}
        state.update({f"mapping.{k}": v for k, v in self.mapping.state_dict().items()})
        return {k: v.detach().contiguous() for k, v in state.items()}

    def load(self, path) -> None:
        state = load_file(str(path))
        self.ca.load_state_dict({k[3:]: v for k, v in state.items() if k.startswith("ca.")})
        self.mapping.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("mapping.")})


def make_ema(cfg, model, ckpt: Path | None):
    """The text path's EMA (train.ema_decay > 0): the checkpoint's, else a copy of the current weights."""
    from t2f.inference import EMA_WEIGHTS

    if cfg.train.ema_decay <= 0:
        return None
    ema = TextPathEMA(model, cfg.train.ema_decay)
    if ckpt is not None and (ckpt / EMA_WEIGHTS).is_file():
        ema.load(ckpt / EMA_WEIGHTS)
    elif ckpt is not None:  # resumed from a run that kept none: the average starts here
        print(f"[t2f] {ckpt} has no {EMA_WEIGHTS}; the EMA starts from the resumed weights", file=sys.stderr)
    return ema
