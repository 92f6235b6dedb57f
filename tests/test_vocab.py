"""Vocabulary: tokenising, encode/decode round trip, <unk>, truncation at C, deterministic build, JSON."""

import pytest

from t2f.data.vocab import Vocab, tokenize
from t2f.tokens import BOS, EOS, PAD, SPECIALS, UNK

CAPTIONS = [
    "The woman has blond hair and wears lipstick.",
    "This man has a beard, and he is smiling!",
    "The woman is smiling.",
]


def test_tokenize_lowercases_and_splits_punctuation():
    assert tokenize("She's SMILING, and wears a hat.") == ["she", "'", "s", "smiling", ",", "and", "wears", "a", "hat", "."]


def test_round_trip_of_known_words():
    vocab = Vocab.build(CAPTIONS)
    for caption in CAPTIONS:
        ids = vocab.encode(caption)
        assert ids[0] == BOS and ids[-1] == EOS and UNK not in ids
        assert tokenize(vocab.decode(ids)) == tokenize(caption)
    assert vocab.decode(vocab.encode(CAPTIONS[2])) == "the woman is smiling."


def test_unknown_words_map_to_unk():
    vocab = Vocab.build(CAPTIONS)
    ids = vocab.encode("The woman has purple hair.")
    assert ids.count(UNK) == 1
    assert vocab.decode(ids) == "the woman has <unk> hair."


def test_min_count_and_max_size():
    vocab = Vocab.build(CAPTIONS, min_count=2)
    assert "the" in vocab.stoi and "beard" not in vocab.stoi
    small = Vocab.build(CAPTIONS, max_size=7)
    assert len(small) == 7
    # the cap keeps the most frequent words (ties alphabetical), the same ones min_count=2 keeps first
    assert small.itos[4:] == Vocab.build(CAPTIONS, min_count=2).itos[4:7]


def test_truncation_at_max_tokens_keeps_eos():
    vocab = Vocab.build(CAPTIONS)
    long_caption = " ".join(["the woman is smiling"] * 30)
    ids = vocab.encode(long_caption, max_tokens=50)
    assert len(ids) == 50 and ids[0] == BOS and ids[-1] == EOS
    assert vocab.decode(ids).split() == tokenize(long_caption)[:48]
    with pytest.raises(ValueError):
        vocab.encode("hi", max_tokens=1)


def test_build_is_deterministic_and_order_free():
    a = Vocab.build(CAPTIONS)
    b = Vocab.build(list(reversed(CAPTIONS)))
    assert a.itos == b.itos
    # ties are alphabetical: 'has' and 'smiling' both appear twice
    assert a.itos.index("has") < a.itos.index("smiling")


def test_decode_skips_pad_and_bos_and_stops_at_eos():
    vocab = Vocab.build(CAPTIONS)
    woman = vocab.stoi["woman"]
    assert vocab.decode([BOS, woman, EOS, woman, PAD]) == "woman"


def test_pad_batch_right_pads():
    vocab = Vocab.build(CAPTIONS)
    batch = vocab.pad_batch([vocab.encode(c) for c in CAPTIONS])
    lengths = [len(vocab.encode(c)) for c in CAPTIONS]
    assert batch.shape == (3, max(lengths))
    assert (batch[2, lengths[2]:] == PAD).all() and batch[2, lengths[2] - 1] == EOS


def test_save_load_round_trip(tmp_path):
    vocab = Vocab.build(CAPTIONS)
    vocab.save(tmp_path / "vocab.json")
    loaded = Vocab.load(tmp_path / "vocab.json")
    assert loaded.itos == vocab.itos and len(loaded) == len(vocab)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        Vocab.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not a t2f vocabulary"):
        Vocab.load(tmp_path / "bad.json")


def test_the_vocabulary_writes_the_shared_special_ids():
    """The recaptioner decodes from BOS to EOS and the loss skips PAD by t2f.tokens' ids: a vocabulary
    must put its specials exactly there."""
    vocab = Vocab.build(CAPTIONS)
    assert [vocab.itos[i] for i in (PAD, BOS, EOS, UNK)] == list(SPECIALS) == ["<pad>", "<bos>", "<eos>", "<unk>"]
    ids = vocab.encode("the woman zebra")
    assert (ids[0], ids[-1], ids[-2]) == (BOS, EOS, UNK)
