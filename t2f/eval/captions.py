"""BLEU-4 of captions decoded by the recaptioner: is it reading faces well enough to train through?

Protocol (state it next to every number): sacreBLEU corpus BLEU-4, its '13a' tokeniser,
lower-cased (our vocabulary lower-cases everything), on a 0-100 scale, all references of an
image used at once (images may have different numbers of references).
"""

import torch
from tqdm.auto import tqdm

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
