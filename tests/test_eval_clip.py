"""CLIP score and R-precision (t2f/eval/clip.py) on a tiny random CLIP saved with `save_pretrained`
(both towers, tokenizer, image processor): the embeddings are Hugging Face's, the scores stay in
range, R-precision is 1 when images and captions match one to one and chance when shuffled, and its
distractors are drawn the same way whatever order the ranks delivered them in."""

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import WORDS

from t2f.eval.clip import clip_score, draw_distractors, load_clip_scorer, missing_image_tower, r_precision

CAPTIONS = ["the woman has blond hair .", "a smiling man with black hair .", "the man wears eyeglasses and a hat ."]


def tiny_clip(folder: Path, projection_dim: int = 24, image_size: int = 32) -> Path:
    """A random 2-layer CLIPModel (text and vision towers) with a word-level tokenizer covering tests/tiny.py's WORDS.

    projection_dim 24 = the tiny BERT's width, so a tiny checkpoint trained on BERT features can be
    evaluated with this CLIP as its text encoder.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["."]
    tokens = letters + [c + "</w>" for c in letters] + [w + "</w>" for w in WORDS if len(w) > 1]
    vocab = {tok: i for i, tok in enumerate(tokens + ["<|startoftext|>", "<|endoftext|>"])}
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                projection_dim=projection_dim)  # also inside text_config: the text encoder loads the text tower alone
    vision = dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, projection_dim=projection_dim)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)).save_pretrained(folder)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    crop = {"height": image_size, "width": image_size}
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=crop).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("clip"))


def _images(n: int, size: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1  # (N, 3, S, S) in [-1, 1]


def test_clip_score_is_100_times_the_clipped_cosine_of_hugging_faces_embeddings(clip_dir):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    scorer = load_clip_scorer(str(clip_dir), local_files_only=True)
    images = _images(3)
    image, text = scorer.image_embeds(images), scorer.text_embeds(CAPTIONS)  # (3, 24) each
    assert image.shape == text.shape == (3, 24)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(3))

    model = CLIPModel.from_pretrained(clip_dir).eval()
    pixels = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # what a PNG holds
    inputs = CLIPImageProcessor.from_pretrained(clip_dir)(images=list(pixels), return_tensors="pt")
    tokens = CLIPTokenizer.from_pretrained(clip_dir)(CAPTIONS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=inputs["pixel_values"], **tokens)
    cosine = out.logits_per_image / model.logit_scale.exp()  # (3 images, 3 captions)
    torch.testing.assert_close(image @ text.T, cosine, atol=1e-5, rtol=1e-5)

    scores = clip_score(image, text)
    torch.testing.assert_close(scores, 100 * cosine.diagonal().clamp_min(0), atol=1e-3, rtol=1e-5)
    assert ((scores >= 0) & (scores <= 100)).all()
    assert clip_score(image, -image).eq(0).all() and clip_score(image, image).sub(100).abs().max() < 1e-3


def test_a_text_encoder_without_image_tower_is_named_as_such(clip_dir, tmp_path):
    from tiny import tiny_bert

    assert missing_image_tower(str(clip_dir), local_files_only=True) is None
    why = missing_image_tower(str(tiny_bert(tmp_path / "bert")), local_files_only=True)
    assert "(bert) has no CLIP image tower" in why and "eval.clip" in why and "attribute metrics" in why
    with pytest.raises(FileNotFoundError, match="eval.clip=DIR"):
        missing_image_tower(str(tmp_path / "nowhere"), local_files_only=True)


# ---------------------------------------------------------------------------- R-precision


def _records(images: np.ndarray, texts: np.ndarray, captions=None, seed: int = 0) -> list[dict]:
    captions = captions or [f"caption {i}" for i in range(len(images))]
    return [{"key": f"{i:05d}", "caption_index": 0, "caption": captions[i],
             "r_precision": {"image": images[i], "text": texts[i], "real": texts[i], "seed": seed}}
            for i in range(len(images))]


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("n", [300, 1000])  # a mask per image below 4 x 99 candidates, rejection sampling above
def test_r_precision_is_one_when_images_match_their_captions_and_chance_when_shuffled(n):
    rng = np.random.default_rng(0)
    texts = _unit(rng.normal(size=(n, 64)))
    images = _unit(texts + 0.3 * rng.normal(size=(n, 64)) / 8)  # each image nearest its own caption
    score, candidates = r_precision(_records(images, texts))
    assert score == 1.0 and candidates == 100

    shuffled = images[rng.permutation(n)]
    chance, _ = r_precision(_records(shuffled, texts))
    assert chance < 0.05  # chance is 1/100; an image "matches" its caption only by accident


def test_r_precision_distractors_are_other_images_other_text_and_seeded():
    keys = [f"{i // 2:04d}" for i in range(600)]  # two captions per image, as under --protocol all
    captions = [f"text {i % 250}" for i in range(600)]  # some texts shared between images
    records = [{"key": k, "caption": c} for k, c in zip(keys, captions)]
    first = list(draw_distractors(records, seed=3, count=99))
    for i, drawn in enumerate(first):
        assert len(drawn) == len(set(drawn.tolist())) == 99
        assert all(keys[j] != keys[i] and captions[j] != captions[i] for j in drawn)
    assert all(np.array_equal(a, b) for a, b in zip(first, draw_distractors(records, seed=3, count=99)))
    assert not all(np.array_equal(a, b) for a, b in zip(first, draw_distractors(records, seed=4, count=99)))

    few = [{"key": k, "caption": f"c{k}"} for k in "abcde"]  # a small subset: every other image is a candidate
    assert [sorted(d.tolist()) for d in draw_distractors(few, 0, 99)][0] == [1, 2, 3, 4]


def test_a_folder_without_image_processor_gets_clips_own_preprocessing(clip_dir, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(clip_dir, bare)
    (bare / "preprocessor_config.json").unlink()
    images = _images(2)
    saved = load_clip_scorer(str(clip_dir), local_files_only=True).image_embeds(images)
    torch.testing.assert_close(load_clip_scorer(str(bare), local_files_only=True).image_embeds(images), saved)
