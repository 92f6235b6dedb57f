"""Ids of the special tokens every caption vocabulary starts with, and their spellings.

They live at the bottom of the package (DESIGN.md, Layers) because three layers agree on them:
the vocabulary writes them (t2f/data/vocab.py), the recaptioner decodes from <bos> to <eos>
(t2f/models/recaptioner.py) and the caption loss skips <pad> (t2f/losses.py).
"""

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")  # SPECIALS[i] is the word of id i
