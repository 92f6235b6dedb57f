"""The trainable part of t2f in one module: CA head + mapper + recaptioner.

One `nn.Module` so that DDP wraps it once and DeepSpeed builds one engine. The frozen parts
(text encoder, synthesis network) are passed to `forward` as arguments, never owned, so they
are never prepared, never saved with the trainable weights and never receive gradients.

`forward` computes every loss of one step:
- the recaptioner's own loss on the real (image, caption) pair: the only signal that updates
  the recaptioner (METHOD.md: it must learn to read real faces, or it could agree with the
  mapper on a private code);
- the text-reconstruction loss of the caption read back from the *generated* image: its
  gradient flows through a parameter-detached copy of the recaptioner and the frozen
  generator into the mapper and the CA head only;
- the KL term of the CA head, and the optional w-space regulariser.
"""

import contextlib
import copy

import torch
from torch import nn
from torch.func import functional_call

from t2f.losses import kl_divergence, text_reconstruction_loss
from t2f.models.ca import ConditioningAugmentation
from t2f.models.recaptioner import Recaptioner


class TextToFace(nn.Module):
    def __init__(self, text_dim: int, mapping: nn.Module, recaptioner: Recaptioner, keep_reference_mapping=False):
        super().__init__()
        self.ca = ConditioningAugmentation(text_dim, mapping.z_dim)
        self.mapping = mapping  # initialised from the pretrained generator's own mapping network
        self.recaptioner = recaptioner
        # A frozen copy of the pretrained mapping for the optional w regulariser; a plain attribute
        # (not a submodule) so it is neither trained nor saved nor wrapped by DDP.
        self._reference_mapping = [copy.deepcopy(mapping).requires_grad_(False).eval()] if keep_reference_mapping else []

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
        frozen = {name: p.detach() for name, p in self.recaptioner.named_parameters()}
        with _batch_norm_in_eval_mode(self.recaptioner):
            return functional_call(self.recaptioner, frozen, (images, tokens))

    def forward(self, text_features, tokens, real_images, synthesis, loss_cfg, joint=True, noise_mode="const",
                force_fp32=False):
        """All losses of one training step; returns (total, logs) with detached scalars in logs."""
        targets = tokens[:, 1:]  # (B, T-1)
        logits, alphas = self.recaptioner(real_images, tokens)
        real_loss, real_parts = text_reconstruction_loss(logits, targets, alphas, loss_cfg.attention_weight)
        logs = {"recaptioner": real_loss.detach(), "recaptioner_ce": real_parts["ce"]}
        if not joint:
            # Warm-up: only the recaptioner learns. The zero term keeps every parameter in the graph
            # so DDP's reducer sees the same parameter set every step (no find_unused_parameters).
            idle = sum(p.sum() for p in (*self.ca.parameters(), *self.mapping.parameters())) * 0.0
            return real_loss + idle, logs

        ws, z, mu, logvar = self.latents(text_features)
        images = synthesis(ws.to(torch.float32), noise_mode=noise_mode, force_fp32=force_fp32)  # (B, C, H, W)
        gen_logits, gen_alphas = self.read_generated(images, tokens)
        trl, trl_parts = text_reconstruction_loss(gen_logits, targets, gen_alphas, loss_cfg.attention_weight)
        kl = kl_divergence(mu, logvar)
        total = real_loss + loss_cfg.kl_weight * kl + loss_cfg.trl_weight * trl
        logs.update(kl=kl.detach(), trl=trl.detach(), trl_ce=trl_parts["ce"], attention=trl_parts["attention"])
        if loss_cfg.w_reg_weight > 0:
            w_reg = self.w_regulariser(z)
            total = total + loss_cfg.w_reg_weight * w_reg
            logs["w_reg"] = w_reg.detach()
        return total, logs

    def w_regulariser(self, z):
        """Mean squared distance of the mapper's w to the pretrained mapping's w at the same z.

        z is detached: the term keeps the mapper near the pretrained mapping and leaves the CA
        head (and its noise, which the KL term governs) alone.
        """
        if not self._reference_mapping:
            raise RuntimeError("loss.w_reg_weight > 0 needs TextToFace(keep_reference_mapping=True)")
        z = z.detach()
        with torch.no_grad():
            w_ref = self._reference_mapping[0](z, None)
        return (self.mapping(z, None) - w_ref).square().mean()


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
    return TextToFace(text_dim, mapping, recaptioner, keep_reference_mapping=cfg.loss.w_reg_weight > 0)
