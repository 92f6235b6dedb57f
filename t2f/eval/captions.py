"""BLEU-4 of captions decoded by the recaptioner: is it reading faces well enough to train through?

Protocol (state it next to every number): sacreBLEU corpus BLEU-4, its '13a' tokeniser,
lower-cased (our vocabulary lower-cases everything), on a 0-100 scale, all references of an
image used at once (images may have different numbers of references).
"""

import torch
from tqdm.auto import tqdm

from t2f.data.remote import public

BLEU_PROTOCOL = "sacreBLEU corpus BLEU-4, tokenize=13a, lowercase, 0-100"


def bleu4(hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU-4 of `hypotheses[i]` against the references `references[i]` (one or more each)."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"got {len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        raise ValueError("BLEU needs at least one hypothesis")
    if any(not refs for refs in references):
        raise ValueError("every hypothesis needs at least one reference caption")
    # sacrebleu wants reference streams (the j-th reference of every sentence); None fills short lists
    most = max(len(refs) for refs in references)
    streams = [[refs[j] if j < len(refs) else None for refs in references] for j in range(most)]
    return float(sacrebleu.corpus_bleu(hypotheses, streams, tokenize="13a", lowercase=True).score)


def recaptioner_bleu4(
    model, images, references: list[list[str]], vocab, beam: int = 1, max_len: int = 50, batch_size: int = 32
) -> float:
    """Decode a caption for each image (greedy when beam=1) and score it with `bleu4`.

    `images` is an (N, 3, H, W) tensor in [-1, 1], or a list of such batches.
    """
    batches = list(images.split(batch_size)) if isinstance(images, torch.Tensor) else list(images)
    device = next(model.parameters()).device
    hypotheses = []
    for batch in tqdm(batches, desc="captioning", unit="batch", leave=False):
        batch = batch.to(device)
        ids = model.greedy(batch, max_len=max_len) if beam == 1 else model.beam_search(batch, beam, max_len)
        hypotheses += [vocab.decode(row) for row in ids]
    return bleu4(hypotheses, references)


def real_image_bleu4(pipeline, shards=None, split=None, max_images=0, batch_size=64) -> dict:
    """The recaptioner alone on real held-out faces: greedy captions vs all captions of each image.

    Check this before trusting the recaptioner as a training signal (`t2f eval --recaptioner-only`).
    """
    from t2f.data.loader import make_eval_loader

    cfg = pipeline.cfg
    shards, split = str(shards or cfg.data.shards), split or cfg.data.eval_split
    loader = make_eval_loader(shards, split, batch_size=batch_size, resolution=cfg.data.resolution, vocab=pipeline.vocab)
    hypotheses, references = [], []
    for batch in tqdm(loader, desc="recaptioner on real images", leave=False):
        hypotheses += pipeline.read_back(batch["image"].to(pipeline.device))
        references += [list(refs) for refs in batch["all_captions"]]
        if max_images and len(hypotheses) >= max_images:
            hypotheses, references = hypotheses[:max_images], references[:max_images]
            break
    return {"recaptioner_bleu4": bleu4(hypotheses, references), "images": len(hypotheses), "shards": public(shards),
            "split": split, "protocol": BLEU_PROTOCOL + "; greedy decoding of real images, all their captions as references",
            "examples": [{"read": h, "reference": r[0]} for h, r in zip(hypotheses[:5], references[:5])]}
