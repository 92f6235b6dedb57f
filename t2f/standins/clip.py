"""CLIP ViT-B/32 stand-in: `CLIPModel` with openai/clip-vit-base-patch32's config, random weights.

    write_clip(Path("clip-vit-base-patch32"), corpus=captions)

The folder is what `save_pretrained` writes for the real model (config.json, model.safetensors of
605 MB, tokenizer.json with its config, the processor's config) plus the hub copy's vocab.json and
merges.txt, so `text.encoder=FOLDER` loads it as it loads the real one. The BPE
vocabulary is CLIP's shape, not its content: 512 byte symbols (with and without `</w>`), 48 894
merges (first those that spell the corpus' words, then fillers that merge byte pairs) and
<|startoftext|> / <|endoftext|> as ids 49406 / 49407: 49 408 entries, as the real one.
"""

import json
from pathlib import Path

import torch

VOCAB_SIZE = 49408
MERGES = VOCAB_SIZE - 2 - 512  # 48 894, as in CLIP's merges.txt
SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def byte_symbols() -> list[str]:
    """GPT-2 / CLIP's printable stand-ins for the 256 byte values, in CLIP's order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def bpe_vocabulary(corpus) -> tuple[dict, list[tuple[str, str]]]:
    """(vocab {token: id}, merges [("a", "b"), ...]) of CLIP's size; the corpus' words become single tokens."""
    base = byte_symbols()
    tokens = base + [s + "</w>" for s in base]
    known, merges = set(tokens), []

    def add(left, right):
        merged = left + right
        if merged not in known and len(merges) < MERGES:
            known.add(merged)
            tokens.append(merged)
            merges.append((left, right))
        return merged

    for word in sorted({w for text in corpus for w in text.lower().replace(".", " .").split() if w.isascii()}):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        prefix = symbols[0]
        for symbol in symbols[1:]:
            prefix = add(prefix, symbol)
    for left in base:  # fillers up to CLIP's count: byte pairs, the way BPE's first merges look
        for right in base + [s + "</w>" for s in base]:
            if len(merges) == MERGES:
                break
            add(left, right)
    vocab = {token: i for i, token in enumerate(tokens + list(SPECIALS))}
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    return vocab, merges


def clip_config():
    """openai/clip-vit-base-patch32's config.json values."""
    from transformers import CLIPConfig

    text = dict(vocab_size=VOCAB_SIZE, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=512,
                bos_token_id=0, eos_token_id=2, pad_token_id=1)
    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
                  patch_size=32, hidden_act="quick_gelu", projection_dim=512)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=512, logit_scale_init_value=2.6592)


def write_clip(folder: Path, corpus, seed: int = 0) -> Path:
    """Write the stand-in into `folder` (created); returns it."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    CLIPModel(clip_config()).save_pretrained(folder)
    vocab, merges = bpe_vocabulary(corpus)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return folder
