"""The toy world's vocabulary of faces: attributes, their constraints, nuisance, and the latent map.

A face is `(attributes, nuisance)`:
- `attributes`: dict over ATTRIBUTES (CelebA names) -> bool; these are what captions name.
- `nuisance`: a `Nuisance`, variation no caption names (face shape, position, skin tone within the
  non-pale range, background, eye spacing, clothes, ...), every field a number in [0, 1] that the
  renderer maps to pixels.

Constraints (`check_attributes` enforces them, the sampler respects them):
- exactly one of Black_Hair, Blond_Hair, Brown_Hair, Gray_Hair, Bald;
- Bald only for men, and a bald head wears no hat and has no bangs;
- Beard only for men ("Beard" is CelebA's No_Beard inverted: present = has a beard);
- Wearing_Lipstick only for women.

One map defines the distribution: `params_from_latent(z)` turns a standard-normal vector z of Z_DIM
numbers (the toy generator's z_dim) into a face. It first scales z to unit second moment, exactly as
StyleGAN2's mapping network does with its input, so the map reads only what a generator can read:
the old map read the raw z, whose length the mapping throws away, and 13% of faces changed an
attribute when z was rescaled that way, an error no fit could remove. Then it thresholds fixed
coordinates for the attributes (Bald too), reads the hair colour from the angle of two coordinates
(below) and pushes further coordinates (LATENT_DIMS in all are read) through the normal CDF for the
nuisance.

`sample_face(rng)` is exactly that map applied to `rng.standard_normal(Z_DIM)`, so a generator
regressed onto `render(*params_from_latent(z))` sees the same distribution as the data. Marginals
(those of a standard normal; the scaling moves them < 1%): Male 50%, Smiling 50%, Eyeglasses 25%,
Pale_Skin 25%, Mouth_Slightly_Open 40%, Bald 15%, Black/Brown/Blond/Gray hair 25.5/21.2/21.2/17%,
Wearing_Hat 21%, Bangs 30%, Beard 25%, Lipstick 30%.

Hair is a direction, not a position on a line: the angle of (z[_Z_HAIR], z[_Z_HAIR_2]) is cut into
sectors (black, brown, blond, gray; the angle of two independent normals is uniform, so the shares
are those of the old bands), and every colour borders the average face, as a hair colour is a
direction from the mean in a real generator's latent space. The sectors are the same for men and
women, and baldness is a threshold on a coordinate of its own (30% of men). The previous world cut
the angle by sex (bald took the first 30% of the turn for men, whose colours shared the rest), so a
man's black hair lay where a woman's is brown: through the sharp 56000-step generator the text path
put every held-out "man ... black hair" caption at a woman's black angle (drawn bald or gray, 30 of
30), since one direction per colour could not serve both sexes and the sharp borders gave no
gradient towards the other sector. The first world cut one coordinate into bands: gray sat at the
far end, behind blond, and training never reached it (0 of 39 held-out gray captions drew gray hair;
gradient descent on z through the generator and recaptioner, started from the CA head's z, reached
gray for 0 of 16 captions, started in the blond band for 13).
"""

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

ATTRIBUTES = (
    "Male", "Smiling", "Eyeglasses", "Wearing_Hat", "Black_Hair", "Blond_Hair", "Brown_Hair",
    "Gray_Hair", "Bald", "Beard", "Wearing_Lipstick", "Mouth_Slightly_Open", "Bangs", "Pale_Skin",
)
HAIR = ("Black_Hair", "Brown_Hair", "Blond_Hair", "Gray_Hair", "Bald")

# Share of each hair colour among faces that are not bald (order of HAIR[:4]).
_HAIR_SHARES = (0.30, 0.25, 0.25, 0.20)
_BALD_AMONG_MEN = 0.30
# Latent coordinates that decide the attributes; nuisance uses the ones after them (Bald the one after those).
_Z_MALE, _Z_HAIR, _Z_SMILE, _Z_GLASSES, _Z_HAT, _Z_FACIAL, _Z_OPEN, _Z_BANGS, _Z_PALE = range(9)
_ATTRIBUTE_DIMS = 9


@dataclass(frozen=True)
class Nuisance:
    """What captions never name; every field in [0, 1], 0.5 is the average face."""

    face_width: float = 0.5
    face_height: float = 0.5
    offset_x: float = 0.5
    offset_y: float = 0.5
    skin_tone: float = 0.5  # light -> dark within the non-pale range (a Pale_Skin face ignores most of it)
    eye_spacing: float = 0.5
    mouth_width: float = 0.5
    hair_shade: float = 0.5  # lightness within the hair colour, and the colour of a bald man's beard
    hair_length: float = 0.5
    iris_hue: float = 0.5
    hat_hue: float = 0.5
    shirt_hue: float = 0.5
    bg_hue: float = 0.5
    bg_hue_shift: float = 0.5
    bg_value: float = 0.5
    bg_angle: float = 0.5

    @classmethod
    def size(cls) -> int:
        return len(dataclasses.fields(cls))

    def to_vector(self) -> np.ndarray:
        """(N,) float32 in [0, 1], fields in declaration order."""
        return np.array([getattr(self, f.name) for f in dataclasses.fields(self)], dtype=np.float32)

    @classmethod
    def from_vector(cls, vector) -> "Nuisance":
        vector = np.asarray(vector, dtype=np.float64).reshape(-1)
        if vector.shape[0] != cls.size():
            raise ValueError(f"Nuisance.from_vector needs {cls.size()} numbers, got {vector.shape[0]}")
        clipped = np.clip(vector, 0.0, 1.0)
        return cls(*(float(v) for v in clipped))


_Z_HAIR_2 = _ATTRIBUTE_DIMS + Nuisance.size()  # the hair angle's second axis, after the nuisance coordinates
_Z_BALD = _Z_HAIR_2 + 1
LATENT_DIMS = _Z_BALD + 1
Z_DIM = 32  # the world's latent, which is the toy generator's z; the coordinates after LATENT_DIMS only scale it


def _normal_cdf(x):
    return 0.5 * (1.0 + math.erf(float(x) / math.sqrt(2.0)))


def _hair_angle(x: float, y: float) -> float:
    """The angle of (x, y) as a fraction of a turn, in [0, 1): uniform when x, y are independent normals."""
    return (math.atan2(y, x) / (2 * math.pi)) % 1.0


def _hair_from_uniform(u: float) -> str:
    """The colour whose share of _HAIR_SHARES holds u (a fraction of a turn, so the last colour
    borders the first); the same for men and women."""
    edge = 0.0
    for name, share in zip(HAIR, _HAIR_SHARES):
        edge += share
        if u < edge:
            return name
    return HAIR[3]


def params_from_latent(z) -> tuple[dict, Nuisance]:
    """Fixed map from a standard-normal z (Z_DIM numbers) to (attributes, nuisance).

    z is scaled to unit second moment first (StyleGAN2's mapping does the same), so z and 3 * z are
    the same face. Coordinates 0 and 2..8 decide Male, Smiling, Eyeglasses, Wearing_Hat, Beard/Lipstick,
    Mouth_Slightly_Open, Bangs, Pale_Skin by thresholds on their normal CDF; the angle of coordinates
    1 and 25 decides the hair colour, coordinate 26 whether a man is bald; coordinates 9..24 become the
    Nuisance fields through the normal CDF.
    """
    z = np.asarray(z, dtype=np.float64).reshape(-1)
    if z.shape[0] != Z_DIM:
        raise ValueError(f"params_from_latent needs a latent of {Z_DIM} numbers (the toy generator's z_dim), got {z.shape[0]}")
    z = z / np.sqrt(np.mean(z * z) + 1e-8)  # as StyleGAN2's normalize_2nd_moment (same epsilon)
    u = [_normal_cdf(v) for v in z[:LATENT_DIMS]]
    male = u[_Z_MALE] >= 0.5
    bald = male and u[_Z_BALD] < _BALD_AMONG_MEN
    hair = "Bald" if bald else _hair_from_uniform(_hair_angle(z[_Z_HAIR], z[_Z_HAIR_2]))
    attrs = {name: False for name in ATTRIBUTES}
    attrs.update(
        Male=male,
        Smiling=u[_Z_SMILE] < 0.5,
        Eyeglasses=u[_Z_GLASSES] < 0.25,
        Wearing_Hat=not bald and u[_Z_HAT] < 0.25,
        Beard=male and u[_Z_FACIAL] < 0.5,
        Wearing_Lipstick=not male and u[_Z_FACIAL] < 0.6,
        Mouth_Slightly_Open=u[_Z_OPEN] < 0.4,
        Bangs=not bald and u[_Z_BANGS] < 0.35,
        Pale_Skin=u[_Z_PALE] < 0.25,
    )
    attrs[hair] = True
    return attrs, Nuisance.from_vector(u[_ATTRIBUTE_DIMS:_Z_HAIR_2])


def sample_face(rng: np.random.Generator) -> tuple[dict, Nuisance]:
    """A random face from the world's distribution (the latent map on a fresh normal vector)."""
    return params_from_latent(rng.standard_normal(Z_DIM))


def sample_attributes(rng: np.random.Generator) -> dict:
    return sample_face(rng)[0]


def check_attributes(attrs: dict) -> dict:
    """Return `attrs` as a full {name: bool} dict, or raise ValueError naming the broken rule."""
    unknown = sorted(set(attrs) - set(ATTRIBUTES))
    if unknown:
        raise ValueError(f"unknown attribute(s) {unknown}; the toy world knows {list(ATTRIBUTES)}")
    full = {name: bool(attrs.get(name, False)) for name in ATTRIBUTES}
    hair = [name for name in HAIR if full[name]]
    if len(hair) != 1:
        raise ValueError(f"a face needs exactly one of {list(HAIR)}, got {hair or 'none'}")
    rules = [
        (full["Bald"] and not full["Male"], "Bald is for men only"),
        (full["Bald"] and full["Wearing_Hat"], "a bald face wears no hat"),
        (full["Bald"] and full["Bangs"], "a bald face has no bangs"),
        (full["Beard"] and not full["Male"], "Beard is for men only"),
        (full["Wearing_Lipstick"] and full["Male"], "Wearing_Lipstick is for women only"),
    ]
    for broken, message in rules:
        if broken:
            raise ValueError(f"invalid attributes: {message} (got {[n for n in ATTRIBUTES if full[n]]})")
    return full


def attribute_vector(attrs: dict) -> np.ndarray:
    """(A,) float32 0/1 in ATTRIBUTES order."""
    return np.array([float(bool(attrs.get(name, False))) for name in ATTRIBUTES], dtype=np.float32)


def attributes_from_vector(vector) -> dict:
    """Inverse of attribute_vector (values > 0.5 are present); not checked against the constraints."""
    vector = np.asarray(vector).reshape(-1)
    if vector.shape[0] != len(ATTRIBUTES):
        raise ValueError(f"expected {len(ATTRIBUTES)} attribute values, got {vector.shape[0]}")
    return {name: bool(v > 0.5) for name, v in zip(ATTRIBUTES, vector)}
