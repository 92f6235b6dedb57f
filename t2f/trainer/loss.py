"""The training loss of one step as a small object that takes the model (DiT's `training_losses`).

    loss_fn = TrainingLoss(cfg.loss)
    total, logs = loss_fn(model, text_features, tokens, real_images, joint=True)

    total = L_real + λ1·L_KL + λ2·L_TRL (+ w_reg_weight · w regulariser)

L_real is the recaptioner's caption loss on the real pair (it alone trains the recaptioner);
L_TRL the same loss on the face generated from the caption, whose gradient reaches only the CA
head and the mapper (see t2f/models/text_to_face.py). Logged parts are detached tensors: turning
them into numbers syncs the GPU, so the trainer does it only at its log interval.
"""

from t2f.losses import kl_divergence, text_reconstruction_loss


class TrainingLoss:
    def __init__(self, loss_cfg):
        self.kl_weight, self.trl_weight = loss_cfg.kl_weight, loss_cfg.trl_weight
        self.attention_weight, self.w_reg_weight = loss_cfg.attention_weight, loss_cfg.w_reg_weight

    def __call__(self, model, text_features, tokens, real_images, joint=True):
        """(total loss, {name: detached scalar}) of one step; `model` may be DDP/DeepSpeed-wrapped."""
        # Without text reconstruction (λ2 = 0, the ablation) the generated face teaches nothing: skip it.
        out = model(text_features, tokens, real_images, joint=joint, generate=self.trl_weight > 0)
        targets = tokens[:, 1:]  # (B, T-1): the words each step must predict
        real, real_parts = self._reading_loss(out["real"], targets)
        logs = {"recaptioner": real.detach(), "recaptioner_ce": real_parts["ce"]}
        if not joint:
            return real + out["idle"], logs
        kl = kl_divergence(out["mu"], out["logvar"])
        total = real + self.kl_weight * kl + out.get("idle", 0.0)
        logs["kl"] = kl.detach()
        if "generated" in out:
            trl, trl_parts = self._reading_loss(out["generated"], targets)
            total = total + self.trl_weight * trl
            logs.update(trl=trl.detach(), trl_ce=trl_parts["ce"], attention=trl_parts["attention"])
        if self.w_reg_weight > 0:
            if "w_gap" not in out:
                raise RuntimeError("loss.w_reg_weight > 0 needs TextToFace(keep_reference_mapping=True)")
            total = total + self.w_reg_weight * out["w_gap"]
            logs["w_reg"] = out["w_gap"].detach()
        return total, logs

    def _reading_loss(self, reading, targets):
        logits, alphas = reading  # (B, T-1, V), (B, T-1, L)
        return text_reconstruction_loss(logits, targets, alphas, self.attention_weight)
