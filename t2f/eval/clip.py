"""Text–image agreement with CLIP: CLIP score and R-precision, from the checkpoint the text encoder comes from.

    scorer = load_clip_scorer("openai/clip-vit-base-patch32", local_files_only=True, device="cuda")
    images, texts = scorer.image_embeds(generated), scorer.text_embeds(captions)   # (B, P), unit length
    clip_score(images, texts)                          # (B,) 100 * max(cos, 0)
    r_precision(records)                               # top-1 among the true caption and 99 others

- CLIP score (Hessel et al. 2021, as torchmetrics' CLIPScore computes it): 100 × the cosine of the
  image and caption embeddings, clipped at 0, averaged over the generated images.
- R-precision (AttnGAN, Xu et al. 2018, with CLIP's encoders as in CLIP-R-precision): each
  generated image ranks its true caption among 99 captions of other test images (none with the
  same text); the score is the share of images whose true caption ranks first (chance: 0.01).
  The distractors are drawn from the whole evaluated set, so rank 0 draws them after gathering
  every rank's embeddings, in a fixed order, from one seeded generator: any number of ranks
  draws the same ones.
Both are also reported for the real test images with the same captions and distractors
(`*_real`): the value a perfect generator would get under this CLIP, which a number needs beside it.

Images go through the checkpoint's own CLIPImageProcessor (resize the short side, centre crop,
CLIP's normalisation) after 8-bit quantisation, as a saved PNG would. A checkpoint without an
image tower (a BERT-like text encoder such as the toy world's MiniLM, or a CLIP text tower saved
alone) has nothing to compare images with: `missing_image_tower` says why, and the metrics are
skipped with that reason.
"""

import os
from collections import Counter

import numpy as np
import torch

from t2f.visual import to_uint8

R_PRECISION_DISTRACTORS = 99  # AttnGAN: the true caption against 99 mismatched ones
CLIP_SCORE_PROTOCOL = ("CLIP score: 100 x max(cos(image, caption), 0) with the CLIP image and text towers of "
                       "eval.clip (empty: text.encoder), mean over generated images; clip_score_real: the real image of the "
                       "caption")
R_PRECISION_PROTOCOL = (f"R-precision (AttnGAN's, CLIP encoders): the true caption ranked among {R_PRECISION_DISTRACTORS} "
                        "captions of other evaluated test images (other text, drawn with seed eval.seed), top-1 accuracy; "
                        "r_precision_real: the real images")


def clip_source(cfg) -> str:
    return cfg.eval.clip or cfg.text.encoder


def _offline(cfg) -> bool:
    return cfg.text.local_files_only or os.environ.get("HF_HUB_OFFLINE") == "1"


def missing_image_tower(name: str, local_files_only: bool) -> str | None:
    """Why `name` cannot score images (a one-line reason), or None when it holds a CLIP image tower.

    Raises FileNotFoundError when the checkpoint itself cannot be found.
    """
    from transformers import AutoConfig

    from t2f.models.text_encoder import resolve_model_path

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(name), local_files_only=local_files_only,
                                            trust_remote_code=False)
    except OSError as err:
        raise FileNotFoundError(f"CLIP score and R-precision need the CLIP checkpoint {name!r}, which could not be "
                                f"loaded ({' '.join(str(err).split())[:200]}); stage it as README 'Offline compute "
                                "nodes' says, or set eval.clip=DIR") from None
    if config.model_type == "clip":
        return None
    return (f"{name!r} ({config.model_type}) has no CLIP image tower, so CLIP score and R-precision cannot be "
            "measured; set eval.clip to a CLIP checkpoint with both towers (on toy shards the attribute metrics "
            "measure text-image agreement)")


class ClipScorer:
    """A frozen CLIPModel (both towers) and its tokenizer and image processor: unit-length embeddings."""

    def __init__(self, model, tokenizer, processor, device="cpu", batch_size: int = 64):
        self.model = model.requires_grad_(False).eval().to(device)
        self.tokenizer, self.processor, self.batch_size = tokenizer, processor, batch_size
        self.device = torch.device(device)
        self.max_length = model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] -> (B, P) unit-length CLIP image embeddings (float32, CPU)."""
        pixels = list(to_uint8(images))  # (H, W, 3) uint8 each: what a saved PNG holds
        out = []
        for start in range(0, len(pixels), self.batch_size):
            x = self.processor(images=pixels[start:start + self.batch_size], return_tensors="pt")["pixel_values"]
            pooled = self.model.vision_model(pixel_values=x.to(self.device)).pooler_output  # (b, H_v)
            out.append(self.model.visual_projection(pooled).float().cpu())  # (b, P)
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def text_embeds(self, captions: list[str]) -> torch.Tensor:
        """Captions -> (B, P) unit-length CLIP text embeddings (cut to CLIP's 77-token window)."""
        tokens = self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        pooled = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
        return torch.nn.functional.normalize(self.model.text_projection(pooled).float().cpu(), dim=-1)  # (B, P)


def load_clip_scorer(name: str, local_files_only: bool = False, device="cpu") -> ClipScorer:
    """CLIP with both towers from a hub id or a `save_pretrained` folder; never runs remote code."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel
    from transformers.utils import logging as hf_logging

    from t2f.models.text_encoder import resolve_model_path

    path, kwargs = resolve_model_path(name), dict(local_files_only=local_files_only, trust_remote_code=False)
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar would bury the evaluation's own
    try:
        model = CLIPModel.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except OSError as err:
        raise FileNotFoundError(f"could not load the CLIP checkpoint {name!r} ({' '.join(str(err).split())[:200]})") from None
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    try:
        processor = CLIPImageProcessor.from_pretrained(path, **kwargs)
    except OSError:  # a folder saved without preprocessor_config.json: CLIP's own preprocessing
        size = model.config.vision_config.image_size
        processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return ClipScorer(model, tokenizer, processor, device)


def build_clip_scorer(cfg, device) -> ClipScorer:
    """The CLIP of `eval.clip` (empty: `text.encoder`); raises MissingImageTower when it has no image tower."""
    name = clip_source(cfg)
    why = missing_image_tower(name, _offline(cfg))
    if why is not None:
        raise MissingImageTower(why)
    return load_clip_scorer(name, _offline(cfg), device)


class MissingImageTower(RuntimeError):
    """The configured checkpoint cannot embed images; the message says why (evaluate() skips the metric)."""


# ---------------------------------------------------------------------------- the metrics


def clip_score(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """(B,) 100 * max(cos, 0) of matching rows of unit-length embeddings."""
    return 100 * (images * texts).sum(-1).clamp_min(0)


def embeddings(scorer: ClipScorer, generated) -> dict:
    """Unit-length embeddings of a chunk's generated images, captions and paired real images (made once per chunk)."""
    return generated.memo("clip", lambda: {"image": scorer.image_embeds(generated.images),
                                           "text": scorer.text_embeds(generated.captions),
                                           "real": scorer.image_embeds(generated.reals)})


def score_clip(scorer, generated) -> list:
    e = embeddings(scorer, generated)
    return [{"generated": float(g), "real": float(r)}
            for g, r in zip(clip_score(e["image"], e["text"]), clip_score(e["real"], e["text"]))]


def summarise_clip(records) -> dict:
    rows = [r["clip_score"] for r in records]
    return {"clip_score": float(np.mean([r["generated"] for r in rows])),
            "clip_score_real": float(np.mean([r["real"] for r in rows]))}


def score_r_precision(scorer, generated) -> list:
    e, seed = embeddings(scorer, generated), generated.pipeline.cfg.eval.seed
    return [{"image": i.numpy(), "text": t.numpy(), "real": r.numpy(), "seed": seed}
            for i, t, r in zip(e["image"], e["text"], e["real"])]


def r_precision(records, distractors: int = R_PRECISION_DISTRACTORS, field: str = "image") -> tuple[float, int]:
    """(top-1 accuracy, fewest candidates any image was ranked among) over `records` in their order.

    Each record has its `key` (the test image), `caption` and under "r_precision" unit-length
    `field` (image) and `text` embeddings and the draw's `seed`. Distractors: captions of records
    of other keys whose text differs from the true caption, `distractors` of them (all there are
    when fewer).
    """
    rows = [r["r_precision"] for r in records]
    images, texts = np.stack([row[field] for row in rows]), np.stack([row["text"] for row in rows])  # (N, P)
    hits, fewest = 0, len(rows)
    for i, drawn in enumerate(draw_distractors(records, rows[0]["seed"], distractors)):
        hits += bool(images[i] @ texts[i] > (texts[drawn] @ images[i]).max(initial=-np.inf))
        fewest = min(fewest, len(drawn) + 1)
    return hits / len(rows), fewest


def draw_distractors(records, seed: int, count: int):
    """Per record, the indices of `count` records of other keys with other caption text (one seeded stream)."""
    keys, captions = [r["key"] for r in records], [r["caption"] for r in records]
    per_key, per_caption, per_both = Counter(keys), Counter(captions), Counter(zip(keys, captions))
    key_array, caption_array = np.array(keys), np.array(captions)
    rng = np.random.default_rng(seed)
    for i, (key, caption) in enumerate(zip(keys, captions)):
        allowed = len(keys) - per_key[key] - per_caption[caption] + per_both[key, caption]
        if allowed <= 4 * count:  # few candidates: list them
            pool = np.flatnonzero((key_array != key) & (caption_array != caption))
            yield pool if len(pool) <= count else rng.choice(pool, count, replace=False)
        else:  # many: rejection sampling, without a pass over every record per image
            yield _rejection_draw(rng, keys, captions, i, count)


def _rejection_draw(rng, keys, captions, i: int, count: int) -> np.ndarray:
    picked: dict = {}  # insertion-ordered set
    while len(picked) < count:
        for j in rng.integers(len(keys), size=2 * count).tolist():
            if keys[j] != keys[i] and captions[j] != captions[i] and j not in picked:
                picked[j] = None
                if len(picked) == count:
                    break
    return np.fromiter(picked, dtype=np.int64)


def summarise_r_precision(records) -> dict:
    generated, _ = r_precision(records)
    real, _ = r_precision(records, field="real")  # the same draws: one seeded stream in the same order
    return {"r_precision": generated, "r_precision_real": real}


def r_precision_details(records) -> dict:
    """How many candidates each image was ranked among: 100 on a full test split, fewer on a small subset."""
    return {"r_precision_candidates": r_precision(records)[1]}
