"""Text encoder parity: our wrapper gives exactly what the Hugging Face model gives, frozen."""

import pytest
import torch
from tiny import WORDS
from tiny import tiny_bert as build_tiny_bert
from transformers import BertModel, BertTokenizer, CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from t2f.models.text_encoder import TextEncoder, TextEncoderError

CAPTIONS = ["the woman has blond hair.", "a smiling man wears eyeglasses and a hat ."]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    # Byte-level BPE vocabulary with one token per whole word plus the letters, so every caption tokenises.
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["."]
    tokens = letters + [c + "</w>" for c in letters] + [w + "</w>" for w in WORDS if len(w) > 1]
    vocab = {tok: i for i, tok in enumerate(tokens + ["<|startoftext|>", "<|endoftext|>"])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, projection_dim=16,
                            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"])
    torch.manual_seed(0)
    CLIPTextModelWithProjection(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return build_tiny_bert(tmp_path_factory.mktemp("bert"))


def test_clip_features_equal_hugging_face_forward(tiny_clip):
    encoder = TextEncoder(str(tiny_clip), local_files_only=True)
    assert encoder.pooling == "clip" and encoder.dim == 16
    reference = CLIPTextModelWithProjection.from_pretrained(tiny_clip).eval()
    tokens = CLIPTokenizer.from_pretrained(tiny_clip)(CAPTIONS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        expected = reference(**tokens).text_embeds
    features = encoder.encode(CAPTIONS)
    assert features.shape == (2, 16)
    torch.testing.assert_close(features, expected)
    assert not features.requires_grad


def test_bert_mean_pooling_ignores_padding(tiny_bert):
    encoder = TextEncoder(str(tiny_bert), local_files_only=True)
    assert encoder.pooling == "mean" and encoder.dim == 24
    reference = BertModel.from_pretrained(tiny_bert).eval()
    tokens = BertTokenizer.from_pretrained(tiny_bert)(CAPTIONS[:1], return_tensors="pt")
    with torch.no_grad():
        alone = reference(**tokens).last_hidden_state.mean(1)  # no padding: a plain mean
    batched = encoder.encode(CAPTIONS)  # the first caption is padded to the second's length here
    torch.testing.assert_close(batched[:1], alone)


def test_encoder_is_frozen_and_stays_in_eval(tiny_bert):
    encoder = TextEncoder(str(tiny_bert), local_files_only=True, dtype=torch.float64)
    encoder.train()
    assert not encoder.model.training
    assert all(not p.requires_grad for p in encoder.parameters())
    assert encoder.encode(CAPTIONS).dtype == torch.float64


def test_long_captions_are_truncated_to_the_window(tiny_clip):
    encoder = TextEncoder(str(tiny_clip), local_files_only=True, max_length=8)
    long = " ".join(["the woman has blond hair"] * 20)
    assert torch.isfinite(encoder.encode([long])).all()


def test_missing_model_names_it_and_says_how_to_fetch(tmp_path):
    with pytest.raises(TextEncoderError, match="(?s)openai/clip-vit-base-patch32.*huggingface-cli download"):
        TextEncoder("openai/clip-vit-base-patch32", local_files_only=True)


def test_packaged_minilm_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder = TextEncoder("sentence-transformers/all-MiniLM-L6-v2")
    features = encoder.encode(["The woman has blond hair.", "The woman has blond hair!", "A bald man with a beard."])
    assert features.shape == (3, 384)
    similar = torch.cosine_similarity(features[0], features[1], dim=0)
    different = torch.cosine_similarity(features[0], features[2], dim=0)
    assert similar > different  # a real pretrained encoder, not random weights
