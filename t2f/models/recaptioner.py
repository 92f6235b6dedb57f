"""The text reconstruction module of METHOD.md: a "Show, Attend and Tell" captioner.

    model = Recaptioner(cfg.recaptioner, vocab_size=len(vocab))
    logits, alphas = model(images, tokens)       # teacher forcing: (B, T-1, V), (B, T-1, L)
    model.greedy(images)  /  model.beam_search(images, beam=3)   # lists of word ids

Images come in the generator's range [-1, 1] at any resolution; every step up to the logits is
differentiable in the image, because the mapper learns through this module.

Image encoders (t2f/models/image_encoders.py): ImageNet ResNet-101 (frozen, the paper's), a small
CNN that trains (tests), or any frozen pretrained CNN described beside its weights (the toy
world's backbone). The encoder is cut before any pooling and classifier and pooled to a grid of
L = grid² feature vectors.

Decoder (per step k): β_k = softmax_i MLP(a_i, h_{k-1}); ẑ_k = sigmoid(W h_{k-1}) ⊙ Σ_i β_ki a_i;
h_k = LSTM([E y_{k-1}, ẑ_k], h_{k-1}); p(y_k) ∝ exp(L_o(E y_{k-1} + L_h h_k + L_z ẑ_k)),
with h_0, c_0 predicted from the mean feature and dropout before L_o.
"""

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from t2f.models.image_encoders import build_image_encoder
from t2f.tokens import BOS, EOS

# ---------------------------------------------------------------------------- decoder parts


class SoftAttention(nn.Module):
    """e_ki = w·tanh(U a_i + W h_{k-1}); β_k = softmax over the L positions."""

    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int):
        super().__init__()
        self.from_features = nn.Linear(feature_dim, attention_dim)
        self.from_hidden = nn.Linear(hidden_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1)

    def forward(self, feats, feats_proj, h):
        # feats_proj = self.from_features(feats), computed once per caption
        e = self.score(torch.tanh(feats_proj + self.from_hidden(h).unsqueeze(1))).squeeze(-1)  # (B, L)
        alpha = e.softmax(dim=1)  # (B, L)
        context = (alpha.unsqueeze(-1) * feats).sum(dim=1)  # (B, D)
        return context, alpha


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """Decode without dropout, then put the module back in the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


# ---------------------------------------------------------------------------- the captioner


class Recaptioner(nn.Module):
    """Image encoder + soft-attention LSTM decoder; sizes come from a RecaptionerConfig."""

    def __init__(self, cfg, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.encoder = build_image_encoder(cfg)
        d, n, m = self.encoder.out_dim, cfg.hidden_dim, cfg.embed_dim
        self.register_buffer("mean", torch.tensor(self.encoder.input_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.encoder.input_std).view(1, 3, 1, 1), persistent=False)

        self.embed = nn.Embedding(vocab_size, m)  # E
        self.attention = SoftAttention(d, n, cfg.attention_dim)
        self.gate = nn.Linear(n, d)
        self.init_h = nn.Linear(d, n)
        self.init_c = nn.Linear(d, n)
        self.lstm = nn.LSTMCell(m + d, n)
        self.out_hidden = nn.Linear(n, m)  # L_h
        self.out_context = nn.Linear(d, m)  # L_z
        self.dropout = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(m, vocab_size)  # L_o

    # -- images to features

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images at any size -> anti-aliased resize to input_size -> normalised as the encoder expects."""
        assert images.dim() == 4 and images.shape[1] == 3, f"expected (B, 3, H, W) images, got {tuple(images.shape)}"
        size = self.cfg.input_size
        x = (images + 1.0) * 0.5  # (B, 3, H, W) in [0, 1]
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)  # (B, 3, S, S)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """The L annotation vectors of each image: (B, L, D)."""
        fmap = self.encoder(self.preprocess(images))  # (B, D, g, g)
        return fmap.flatten(2).transpose(1, 2)  # (B, L, D)

    # -- one decoding step, shared by teacher forcing, greedy and beam search

    def _initial_state(self, feats):
        mean_feat = feats.mean(dim=1)  # (B, D)
        return self.init_h(mean_feat), self.init_c(mean_feat)  # (B, n) each

    def _step(self, feats, feats_proj, prev_embed, h, c):
        context, alpha = self.attention(feats, feats_proj, h)  # (B, D), (B, L)
        context = torch.sigmoid(self.gate(h)) * context  # (B, D)
        h, c = self.lstm(torch.cat([prev_embed, context], dim=1), (h, c))  # (B, n)
        deep = prev_embed + self.out_hidden(h) + self.out_context(context)  # (B, m)
        return self.out(self.dropout(deep)), alpha, h, c  # (B, V), (B, L)

    # -- training

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        """Teacher-forced: read tokens[:, :-1], predict tokens[:, 1:]. Returns logits, alphas."""
        return self.teacher_forced(self.encode_images(images), tokens)

    def teacher_forced(self, feats: torch.Tensor, tokens: torch.Tensor):
        """`forward` on features from `encode_images`: (B, T-1, V) logits, (B, T-1, L) alphas."""
        assert tokens.dim() == 2 and tokens.shape[0] == feats.shape[0] and tokens.shape[1] >= 2, (
            f"expected tokens (B, T>=2) for features {tuple(feats.shape)}, got {tuple(tokens.shape)}"
        )
        feats_proj = self.attention.from_features(feats)  # (B, L, A)
        embeds = self.embed(tokens[:, :-1])  # (B, T-1, m)
        h, c = self._initial_state(feats)
        logits, alphas = [], []
        for k in range(embeds.shape[1]):
            step_logits, alpha, h, c = self._step(feats, feats_proj, embeds[:, k], h, c)
            logits.append(step_logits)
            alphas.append(alpha)
        return torch.stack(logits, dim=1), torch.stack(alphas, dim=1)  # (B, T-1, V), (B, T-1, L)

    # -- decoding (no dropout, no gradients)

    @torch.no_grad()
    def greedy(self, images: torch.Tensor, max_len: int = 50, return_attention: bool = False):
        """Most likely word at each step; ids without <bos>, cut before <eos>, at most max_len steps.

        With `return_attention`, (ids, alphas): alphas[i] is a (len(ids[i]), L) float tensor on the
        CPU, row k the attention β_k the decoder paid to the L image positions when it chose word k.
        """
        with _eval_mode(self):
            return self.greedy_from_features(self.encode_images(images), max_len, return_attention)

    @torch.no_grad()
    def greedy_from_features(self, feats: torch.Tensor, max_len: int = 50, return_attention: bool = False):
        with _eval_mode(self):
            batch = feats.shape[0]
            feats_proj = self.attention.from_features(feats)  # (B, L, A)
            h, c = self._initial_state(feats)
            prev = torch.full((batch,), BOS, dtype=torch.long, device=feats.device)  # (B,)
            done = torch.zeros(batch, dtype=torch.bool, device=feats.device)  # (B,)
            steps, alphas = [], []
            for _ in range(max_len):
                logits, alpha, h, c = self._step(feats, feats_proj, self.embed(prev), h, c)
                prev = logits.argmax(dim=1)  # (B,)
                steps.append(prev.masked_fill(done, EOS))
                if return_attention:
                    alphas.append(alpha.float().cpu())  # (B, L)
                done |= prev == EOS
                if bool(done.all()):
                    break
            rows = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in range(batch)]
            ids = [_cut_at_eos(row) for row in rows]
            if not return_attention:
                return ids
            stacked = torch.stack(alphas, dim=1) if alphas else feats.new_zeros(batch, 0, feats.shape[1]).cpu()  # (B, K, L)
            return ids, [stacked[i, : len(row)] for i, row in enumerate(ids)]

    @torch.no_grad()
    def beam_search(self, images: torch.Tensor, beam: int = 3, max_len: int = 50) -> list[list[int]]:
        """Highest total log-probability caption found with `beam` hypotheses (beam 1 = greedy)."""
        with _eval_mode(self):
            feats = self.encode_images(images)  # (B, L, D)
            return [self._beam_one(feats[i : i + 1], beam, max_len) for i in range(feats.shape[0])]

    def _beam_one(self, feats, beam: int, max_len: int) -> list[int]:
        """Beam search for one image; feats (1, L, D). Scores are raw sums of log-probabilities."""
        assert beam >= 1, f"beam must be at least 1, got {beam}"
        feats_proj = self.attention.from_features(feats)  # (1, L, A)
        h, c = self._initial_state(feats)  # (1, n)
        live = [([], 0.0)]  # (word ids, score) of hypotheses still growing, aligned with rows of h, c
        done = []
        for step in range(max_len):
            k = len(live)
            prev = torch.tensor([seq[-1] if seq else BOS for seq, _ in live], device=feats.device)  # (k,)
            logits, _, h, c = self._step(feats.expand(k, -1, -1), feats_proj.expand(k, -1, -1), self.embed(prev), h, c)
            scores = torch.tensor([s for _, s in live], device=feats.device)  # (k,)
            total = (scores.unsqueeze(1) + logits.float().log_softmax(dim=1)).flatten()  # (k*V,)
            top_scores, top_index = total.topk(min(2 * beam, total.numel()))
            rows, new_live = [], []
            for rank, (score, index) in enumerate(zip(top_scores.tolist(), top_index.tolist())):
                row, word = divmod(index, self.vocab_size)
                if word == EOS:
                    # an ending counts only among the top `beam`, so beam 1 is exactly greedy
                    if rank < beam:
                        done.append((live[row][0], score))
                elif step == max_len - 1:
                    done.append((live[row][0] + [word], score))
                elif len(new_live) < beam:
                    rows.append(row)
                    new_live.append((live[row][0] + [word], score))
            best_done = max((s for _, s in done), default=float("-inf"))
            # log-probabilities are <= 0, so a live hypothesis can only lose score from here on
            if not new_live or best_done >= new_live[0][1]:
                break
            live = new_live
            index = torch.tensor(rows, device=feats.device)
            h, c = h[index], c[index]
        return max(done, key=lambda item: item[1])[0] if done else live[0][0]


def _cut_at_eos(ids: list[int]) -> list[int]:
    return ids[: ids.index(EOS)] if EOS in ids else ids
