"""Captions for toy faces in the Multi-Modal CelebA-HQ style, and a parser that reads them back.

    captions_for({"Male": True, "Black_Hair": True, "Smiling": True, ...}, rng, n=10)
    -> ["This smiling man has black hair.", "The guy has black hair. He is smiling.", ...]
    parse_caption("The woman has blond hair and wears eyeglasses.")  -> {"Blond_Hair": True, ...}

A caption always says the gender (man/woman and their synonyms, he/she) and names every other
attribute the face has and nothing else, so it determines the attribute vector:
parse_caption(c) == attributes for every generated caption. Variety comes from the template (one
to three sentences, a "with ..." noun phrase, "This is ..."), the order of the phrases, and
synonyms ("eyeglasses"/"glasses", "is wearing"/"wears", "smiling man"/"is smiling"/"smiles").
The word list stays small (about 60 words) so the recaptioner can learn it from a toy data set.
"""

import numpy as np

from t2f.data.vocab import tokenize
from t2f.toy.attributes import ATTRIBUTES, check_attributes

_NOUNS = {True: ("man", "gentleman", "guy"), False: ("woman", "lady", "girl")}
_PRONOUN = {True: "He", False: "She"}
_DETERMINERS = ("The", "This", "A")
_HAIR_WORD = {"Black_Hair": "black", "Brown_Hair": "brown", "Blond_Hair": "blond", "Gray_Hair": "gray"}

# Ways to say each attribute: as an adjective before the noun, after "has", after "wears"/"is wearing",
# or after "is". Every attribute has at least one way besides the adjective.
_ADJECTIVE = {"Smiling": ("smiling",), "Bald": ("bald",), "Pale_Skin": ("pale-skinned",)}
_HAS = {
    "Bald": ("a bald head",), "Beard": ("a beard",), "Bangs": ("bangs",), "Pale_Skin": ("pale skin",),
    "Mouth_Slightly_Open": ("a slightly open mouth", "mouth slightly open"),
    **{name: (f"{word} hair",) for name, word in _HAIR_WORD.items()},
}
_WEARS = {"Eyeglasses": ("eyeglasses", "glasses"), "Wearing_Hat": ("a hat",), "Wearing_Lipstick": ("lipstick",)}
_IS = {"Smiling": ("smiling",), "Bald": ("bald",)}

# Parser: a word (after tokenising) that alone names the attribute in every phrase above.
_KEYWORDS = {
    "smiling": "Smiling", "smiles": "Smiling", "eyeglasses": "Eyeglasses", "glasses": "Eyeglasses",
    "hat": "Wearing_Hat", "black": "Black_Hair", "blond": "Blond_Hair", "blonde": "Blond_Hair",
    "brown": "Brown_Hair", "gray": "Gray_Hair", "grey": "Gray_Hair", "bald": "Bald", "beard": "Beard",
    "lipstick": "Wearing_Lipstick", "open": "Mouth_Slightly_Open", "bangs": "Bangs", "pale": "Pale_Skin",
}
_GENDER_WORDS = {w: True for w in ("man", "gentleman", "guy", "he", "his", "him")}
_GENDER_WORDS.update({w: False for w in ("woman", "lady", "girl", "she", "her")})


def captions_for(attributes: dict, rng: np.random.Generator, n: int = 10) -> list[str]:
    """`n` distinct captions of one face (raises if the grammar cannot make that many)."""
    attrs = check_attributes(attributes)
    seen, out = set(), []
    for _ in range(50 * n):
        caption = _one_caption(attrs, rng)
        if caption not in seen:
            seen.add(caption)
            out.append(caption)
            if len(out) == n:
                return out
    raise ValueError(f"the caption grammar made only {len(out)} distinct captions for {attrs}, asked for {n}")


def parse_caption(text: str) -> dict:
    """Attribute dict (every name in ATTRIBUTES) named by a caption of this grammar.

    Reads keywords, so the order and the template do not matter; the result is not checked
    against the world's constraints (a recaptioner may write an impossible face).
    Raises ValueError when the caption names no gender or both.
    """
    words = tokenize(text)
    genders = {_GENDER_WORDS[w] for w in words if w in _GENDER_WORDS}
    if len(genders) != 1:
        found = "both a man and a woman" if genders else "no gender"
        raise ValueError(f"caption {text!r} names {found}; toy captions say man/woman or he/she exactly once")
    attrs = {name: False for name in ATTRIBUTES}
    attrs["Male"] = genders.pop()
    for word in words:
        if word in _KEYWORDS:
            attrs[_KEYWORDS[word]] = True
    return attrs


# ---------------------------------------------------------------------------- generation


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _join(items: list[str]) -> str:
    if len(items) <= 2:
        return " and ".join(items)
    return ", ".join(items[:-1]) + ", and " + items[-1]


def _realise(attrs: dict, rng, adjective_chance: float) -> tuple[list, list, list, list]:
    """Split the present attributes into adjectives, has-, wear- and is-phrases (random choices)."""
    adjectives, has, wears, is_ = [], [], [], []
    for name in ATTRIBUTES:
        if name == "Male" or not attrs[name]:
            continue
        if name in _ADJECTIVE and rng.random() < adjective_chance:
            adjectives.append(_pick(rng, _ADJECTIVE[name]))
        elif name in _WEARS:
            wears.append(_pick(rng, _WEARS[name]))
        elif name in _IS and (name not in _HAS or rng.random() < 0.5):
            is_.append(_pick(rng, _IS[name]))
        else:
            has.append(_pick(rng, _HAS[name]))
    for phrases in (has, wears, is_):
        rng.shuffle(phrases)
    return adjectives, has, wears, is_


def _subject(attrs, rng, adjectives, determiners=_DETERMINERS) -> str:
    words = [_pick(rng, determiners)] + sorted(adjectives, key=lambda _: rng.random())
    return " ".join(words + [_pick(rng, _NOUNS[attrs["Male"]])])


def _one_caption(attrs: dict, rng) -> str:
    if rng.random() < 0.3:
        return _noun_phrase_caption(attrs, rng)
    return _sentence_caption(attrs, rng)


def _sentence_caption(attrs: dict, rng) -> str:
    """One to three sentences: 'The man has X and Y. He is wearing Z.'"""
    adjectives, has, wears, is_ = _realise(attrs, rng, adjective_chance=0.4)
    clauses = []
    if has:
        clauses.append("has " + _join(has))
    if wears:
        clauses.append(_pick(rng, ("wears ", "is wearing ")) + _join(wears))
    if is_ == ["smiling"] and rng.random() < 0.5:
        clauses.append("smiles")
    elif is_:
        clauses.append("is " + _join(is_))
    rng.shuffle(clauses)
    if not clauses:  # everything went into adjectives
        return f"This is {_subject(attrs, rng, adjectives, ('a', 'the'))}."
    subject = _subject(attrs, rng, adjectives)
    sentences, current = [], [clauses[0]]
    for clause in clauses[1:]:
        if rng.random() < 0.5:
            current.append(clause)
        else:
            sentences.append(current)
            current = [clause]
    sentences.append(current)
    text = [f"{subject} {_join(sentences[0])}."]
    text += [f"{_PRONOUN[attrs['Male']]} {_join(s)}." for s in sentences[1:]]
    return " ".join(text)


def _noun_phrase_caption(attrs: dict, rng) -> str:
    """'A smiling woman with blond hair and bangs, wearing lipstick.' (is-phrases become adjectives)."""
    adjectives, has, wears, is_ = _realise(attrs, rng, adjective_chance=1.0)
    adjectives += is_
    head = _pick(rng, ("This is ", "")) + _subject(attrs, rng, adjectives, ("a",))
    head = head[0].upper() + head[1:]
    parts = [head]
    if has:
        parts.append(" with " + _join(has))
    if wears:
        parts.append((", wearing " if has else " wearing ") + _join(wears))
    return "".join(parts) + "."
