"""The trainable part of t2f in one module: CA head + mapper + recaptioner.

One `nn.Module` so that DDP wraps it once and DeepSpeed builds one engine. The frozen synthesis
network is held as a reference set once (`use_synthesis`), never as a submodule: it is never
prepared, never saved with the trainable weights and never receives gradients. The recaptioner's
frozen image encoder is held the same way, inside the encoder (t2f/models/image_encoders.py).

`forward` is the network of one training step, with no loss in it (the losses live in
t2f/trainer/loss.py):
- the recaptioner reads the real (image, caption) pair: the only signal that updates it
  (METHOD.md: it must learn to read real faces, or it could agree with the mapper on a
  private code);
- in the joint phase, the caption's features go CA -> z -> mapper -> w -> frozen synthesis ->
  face, and a parameter-detached copy of the recaptioner reads the face, so the reading's
  gradient reaches the mapper and the CA head only.
"""

import contextlib
import copy

import torch
from torch import nn
from torch.func import functional_call

from t2f.models.ca import ConditioningAugmentation
from t2f.models.recaptioner import Recaptioner


class TextToFace(nn.Module):
    def __init__(self, text_dim: int, mapping: nn.Module, recaptioner: Recaptioner, keep_reference_mapping=False):
        super().__init__()
        self.ca = ConditioningAugmentation(text_dim, mapping.z_dim)
        self.mapping = mapping  # initialised from the pretrained generator's own mapping network
        self.recaptioner = recaptioner
        # Plain attributes (not submodules): neither trained nor saved nor wrapped by DDP.
        self._synthesis, self._noise_mode = [], "const"
        # A frozen copy of the pretrained mapping for the optional w regulariser.
        self._reference_mapping = [copy.deepcopy(mapping).requires_grad_(False).eval()] if keep_reference_mapping else []

    def use_synthesis(self, synthesis: nn.Module, noise_mode: str = "const") -> "TextToFace":
        """The frozen synthesis network the joint phase renders with (set once, before training)."""
        self._synthesis, self._noise_mode = [synthesis], noise_mode
        return self

    def with_text_path(self, ca: nn.Module, mapping: nn.Module) -> "TextToFace":
        """A view of this model with another CA head and mapper (an EMA), sharing the recaptioner."""
        view = copy.copy(self)
        view._modules = dict(self._modules, ca=ca, mapping=mapping)
        return view

    def _apply(self, fn, recurse=True):
        # model.to(device) / .half() reach the plain-attribute reference too, once, at start-up
        for reference in self._reference_mapping:
            reference._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def latents(self, s: torch.Tensor, deterministic=False, truncation_psi=1.0, generator=None):
        """Text features (B, S) -> ws (B, num_ws, w_dim), with the CA statistics."""
        z, mu, logvar = self.ca(s, deterministic=deterministic, generator=generator)  # (B, Z)
        ws = self.mapping(z, None, truncation_psi=truncation_psi)  # (B, num_ws, W)
        return ws, z, mu, logvar

    def read_generated(self, images, tokens):
        """Recaptioner forward with its parameters detached: gradients reach `images`, never its weights.

        Its batch-norm layers read with the running statistics of real images (eval mode), as at
        test time: generated batches neither update those statistics nor get normalised by their own.
        """
        frozen = _detached_for_autocast(self.recaptioner, images.device.type)
        with _batch_norm_in_eval_mode(self.recaptioner):
            return functional_call(self.recaptioner, frozen, (images, tokens))

    def forward(self, text_features, tokens, real_images, joint=True, generate=True) -> dict:
        """One step's network outputs: the readings of the real and (joint) the generated face.

        Returns `real` = (logits (B, T-1, V), alphas (B, T-1, L)) and, when joint, `generated`
        (the same for the generated face), `mu`, `logvar` (B, Z) and `w_gap` (the w regulariser's
        squared distance, when a reference mapping is kept). During warm-up `idle` is a zero that
        keeps the text path in the graph, so DDP's reducer sees one parameter set every step.
        `generate=False` (a run without text reconstruction, loss.trl_weight=0) skips the face and
        its reading, which nothing would learn from: only the CA statistics are computed.
        """
        out = {"real": self.recaptioner(real_images, tokens)}
        if not joint:
            out["idle"] = sum(p.sum() for p in (*self.ca.parameters(), *self.mapping.parameters())) * 0.0
            return out
        if not generate:
            z, out["mu"], out["logvar"] = self.ca(text_features)
            out["idle"] = sum(p.sum() for p in self.mapping.parameters()) * 0.0
        else:
            ws, z, out["mu"], out["logvar"] = self.latents(text_features)
            images = self._synthesis[0](ws.to(torch.float32), noise_mode=self._noise_mode)  # (B, C, H, W)
            out["generated"] = self.read_generated(images, tokens)
        if self._reference_mapping:
            out["w_gap"] = self.w_regulariser(z)
        return out

    def w_regulariser(self, z):
        """Mean squared distance of the mapper's w to the pretrained mapping's w at the same z.

        z is detached: the term keeps the mapper near the pretrained mapping and leaves the CA
        head (and its noise, which the KL term governs) alone.
        """
        z = z.detach()
        with torch.no_grad():
            w_ref = self._reference_mapping[0](z, None)
        return (self.mapping(z, None) - w_ref).square().mean()


def _detached_for_autocast(module: nn.Module, device_type: str) -> dict:
    """`module`'s parameters, detached; under autocast those of its Linear and LSTMCell layers already
    in autocast's dtype (the values autocast gives them).

    Autocast caches its casts only for leaves that require grad: a detached weight is cast again at
    every call, at each of the decoder's ~50 steps, and every copy is kept for the backward pass
    (2.2 GiB at the paper's vocabulary of 30 000 words, whatever the batch size). Cast once here,
    autocast finds them in its dtype and leaves them alone.
    """
    enabled = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if enabled else None
    cast = {f"{prefix}.{name}" if prefix else name for prefix, layer in module.named_modules()
            if enabled and isinstance(layer, (nn.Linear, nn.LSTMCell)) for name, _ in layer.named_parameters(recurse=False)}
    return {name: p.detach().to(dtype) if name in cast else p.detach() for name, p in module.named_parameters()}


@contextlib.contextmanager
def _batch_norm_in_eval_mode(module: nn.Module):
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        for m in norms:
            m.train()


def build_text_to_face(cfg, text_dim: int, generator: nn.Module, vocab_size: int) -> TextToFace:
    """Trainable model for config `cfg`: the mapper starts as a copy of the generator's mapping."""
    mapping = copy.deepcopy(generator.mapping).requires_grad_(True).train()
    recaptioner = Recaptioner(cfg.recaptioner, vocab_size)
    model = TextToFace(text_dim, mapping, recaptioner, keep_reference_mapping=cfg.loss.w_reg_weight > 0)
    return model.use_synthesis(generator.synthesis, cfg.generator.noise_mode)
