"""Tiny stand-ins for the real artefacts, built in a test's tmp dir: a BERT-like text encoder
saved with `save_pretrained`, captioned shards written by the real shard builder, and a
config that trains the whole pipeline on a CPU in seconds."""

from pathlib import Path

import numpy as np
import torch

WORDS = ["the", "woman", "man", "has", "blond", "black", "hair", "a", "smiling", "wears", "eyeglasses",
         "and", "hat", "is", "with", "."]
COLOURS = {"blond": (230, 200, 90), "black": (20, 20, 20)}


def tiny_bert(folder: Path) -> Path:
    """A random 2-layer BERT with a word-level vocabulary covering WORDS."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    BertTokenizer(vocab=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=5 + len(WORDS), hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    return folder


def _face(colour: str, smiling: bool, rng) -> np.ndarray:
    image = np.full((32, 32, 3), 128, np.uint8)
    image[:10] = COLOURS[colour]  # hair
    image[20:24, 10:22] = (200, 40, 40) if smiling else (60, 30, 30)  # mouth
    return np.clip(image + rng.integers(-8, 9, image.shape), 0, 255).astype(np.uint8)


def tiny_shards(folder: Path, train: int = 24, test: int = 8, shard_size: int = 4) -> Path:
    """Captioned 32x32 'faces' in a train and a test split, via the real shard builder."""
    from t2f.data.shards import build_shards
    from t2f.data.sources import SampleSpec

    rng = np.random.default_rng(0)
    samples = []
    for i in range(train + test):
        colour, smiling = ["blond", "black"][i % 2], bool(i // 2 % 2)
        person = "woman" if i % 3 else "man"
        captions = [f"the {person} has {colour} hair{' and is smiling' if smiling else ''} .",
                    f"a {'smiling ' if smiling else ''}{person} with {colour} hair ."]
        samples.append(SampleSpec(f"{i:03d}", _face(colour, smiling, rng), captions, "train" if i < train else "test"))
    build_shards(samples, folder, resolution=32, shard_size=shard_size, progress=False)
    return folder


def tiny_overrides(tmp: Path, run_dir: Path, steps: int = 4) -> list[str]:
    """Overrides of the toy preset that make a whole run take seconds on a CPU."""
    shards = tmp / "shards"
    if not (shards / "manifest.json").exists():
        tiny_shards(shards)
    bert = tmp / "bert"
    if not (bert / "config.json").exists():
        tiny_bert(bert)
    return [
        f"data.shards={shards}", "data.resolution=32", "data.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=8",
        f"text.encoder={bert}", "text.pooling=mean",
        "generator.checkpoint=", "generator.resolution=32", "generator.z_dim=16", "generator.w_dim=16",
        "generator.channel_base=128", "generator.channel_max=16", "generator.mapping_layers=2",
        "recaptioner.encoder=small", "recaptioner.small_channels=8", "recaptioner.feature_grid=4", "recaptioner.input_size=32",
        "recaptioner.embed_dim=16", "recaptioner.hidden_dim=16", "recaptioner.attention_dim=16", "recaptioner.dropout=0.0",
        "optim.name=adamw", "optim.lr=1e-3", "optim.warmup_steps=0",
        f"train.run_dir={run_dir}", f"train.steps={steps}", "train.recaptioner_warmup_steps=0", "train.log_every=1",
        "train.sample_every=0", f"train.ckpt_every={steps}", "wandb.mode=disabled",
    ]
