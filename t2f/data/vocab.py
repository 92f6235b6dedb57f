"""Word vocabulary for the recaptioner: tokenise captions, map words to ids and back, save as JSON.

    vocab = Vocab.build(train_captions, min_count=1, max_size=30000)   # S in METHOD.md
    ids = vocab.encode("The woman has blond hair.", max_tokens=50)     # C in METHOD.md
    vocab.decode(ids)  # -> "the woman has blond hair."

Tokens are lower-cased words; every punctuation mark is a token of its own. Ids 0..3 are the
specials <pad> <bos> <eos> <unk> (t2f/tokens.py); every other word that was not kept at build
time encodes as <unk>.
Build it from the training captions only, so test captions measure generalisation honestly.
"""

import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable

from t2f.tokens import BOS, EOS, PAD, SPECIALS, UNK  # noqa: F401  (re-exported: callers may import them from here)

FORMAT = "t2f-vocab"

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
# Punctuation that reads better glued to the word before it when a caption is decoded.
_GLUE_LEFT = set(".,;:!?)%")


def tokenize(text: str) -> list[str]:
    """Lower-case `text` and split it into words and single punctuation marks."""
    return _TOKEN_RE.findall(text.lower())


def detokenize(tokens: Iterable[str]) -> str:
    """Join tokens with spaces, gluing closing punctuation to the previous word."""
    out = ""
    for tok in tokens:
        if out and tok not in _GLUE_LEFT:
            out += " "
        out += tok
    return out


class Vocab:
    """A fixed word list; `itos[i]` is the word with id i, the first four are the specials."""

    def __init__(self, itos: list[str]):
        if tuple(itos[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with the specials {SPECIALS}, got {itos[:4]}")
        if len(set(itos)) != len(itos):
            raise ValueError("a vocabulary must not list a word twice")
        self.itos = list(itos)
        self.stoi = {word: i for i, word in enumerate(self.itos)}

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1, max_size: int = 30000) -> "Vocab":
        """Keep words seen at least `min_count` times, most frequent first, ties alphabetical.

        `max_size` caps the whole vocabulary, the four specials included.
        """
        if max_size < len(SPECIALS):
            raise ValueError(f"max_size must be at least {len(SPECIALS)} (the specials), got {max_size}")
        counts = Counter(tok for caption in captions for tok in tokenize(caption))
        for special in SPECIALS:
            counts.pop(special, None)
        kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls(list(SPECIALS) + kept[: max_size - len(SPECIALS)])

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, caption: str, max_tokens: int = 50) -> list[int]:
        """[BOS, word ids..., EOS], at most `max_tokens` long: words past the limit are dropped."""
        if max_tokens < 2:
            raise ValueError(f"max_tokens must leave room for <bos> and <eos>, got {max_tokens}")
        words = tokenize(caption)[: max_tokens - 2]
        return [BOS] + [self.stoi.get(w, UNK) for w in words] + [EOS]

    def decode(self, ids) -> str:
        """Words of `ids` (a list or 1-D tensor), skipping <pad>/<bos>, stopping at the first <eos>."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        words = []
        for i in ids:
            if i == EOS:
                break
            if i in (PAD, BOS):
                continue
            words.append(self.itos[i] if 0 <= i < len(self.itos) else SPECIALS[UNK])
        return detokenize(words)

    def pad_batch(self, encoded: list[list[int]]):
        """Right-pad encoded captions with <pad> into a (B, T) LongTensor, T = the longest one."""
        import torch

        if not encoded:
            raise ValueError("pad_batch needs at least one encoded caption")
        length = max(len(ids) for ids in encoded)
        batch = torch.full((len(encoded), length), PAD, dtype=torch.long)  # (B, T)
        for row, ids in enumerate(encoded):
            batch[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        return batch

    def save(self, path) -> None:
        """Write the word list as JSON (UTF-8, one readable file)."""
        payload = {"format": FORMAT, "version": 1, "itos": self.itos}
        Path(path).write_text(json.dumps(payload, ensure_ascii=False, indent=0), encoding="utf-8")

    @classmethod
    def load(cls, path) -> "Vocab":
        """Read a vocabulary written by `save`, from a file or a URL beside remote shards
        (t2f/data/remote.py); a missing or foreign file is a clear error."""
        from t2f.data.remote import RemoteError, is_remote, public, read_bytes

        missing = (f"vocabulary file {public(path)} not found; it is written beside the shards' manifest "
                   "when shards are built, or set recaptioner.vocab=<path>")
        if not is_remote(path) and not Path(path).is_file():
            raise FileNotFoundError(missing)
        try:
            payload = json.loads(read_bytes(path).decode("utf-8"))
        except RemoteError as err:
            raise (FileNotFoundError(missing) if err.missing else err) from None
        except json.JSONDecodeError as err:
            raise ValueError(f"vocabulary file {public(path)} is not valid JSON: {err}") from err
        if not isinstance(payload, dict) or payload.get("format") != FORMAT or "itos" not in payload:
            raise ValueError(f"{public(path)} is not a t2f vocabulary (expected keys 'format': {FORMAT!r} and 'itos')")
        return cls(payload["itos"])

    def __repr__(self) -> str:
        return f"Vocab({len(self)} words)"
