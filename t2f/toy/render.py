"""Procedural 64x64 faces: `render(attributes, nuisance) -> (64, 64, 3) uint8`, deterministic.

Faces are drawn with PIL at SUPERSAMPLE x the output size and box-averaged down, so edges are
anti-aliased (about 0.5 ms a face). Every attribute has one clear visual cue, so a small classifier (and a person) can
read it at 64x64:
  Male: short hair, square jaw, thick brows (women: long hair falling beside the face to the shoulders)
  hair colour: black / brown / blond / gray hair; Bald: no hair and a shiny scalp
  Smiling: upturned mouth;  Mouth_Slightly_Open: dark opening;  Wearing_Lipstick: red, fuller lips
  Eyeglasses: dark frames around the eyes;  Wearing_Hat: coloured crown and brim over the hair
  Bangs: a fringe over the forehead;  Beard: hair-coloured lower face;  Pale_Skin: near-white skin
Everything else (shape, position, non-pale skin tone, background, clothes...) comes from `Nuisance`.
Coordinates below are in output pixels (0..64); `_Pen` scales them to the drawing canvas.
"""

import colorsys
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from t2f.toy.attributes import (  # noqa: F401  (re-exported: the world's API lives here too)
    ATTRIBUTES,
    LATENT_DIMS,
    Nuisance,
    attribute_vector,
    check_attributes,
    params_from_latent,
    sample_attributes,
    sample_face,
)

SIZE = 64
SUPERSAMPLE = 4

_HAIR_RGB = {"Black_Hair": (38, 32, 32), "Brown_Hair": (104, 58, 28), "Blond_Hair": (228, 192, 102),
             "Gray_Hair": (168, 168, 174)}
# The darkest skin stays clearly lighter than brown hair, so hair reads against the face.
_LIGHT_SKIN, _DARK_SKIN = (226, 184, 148), (152, 102, 74)
_PALE_SKIN = (250, 232, 224)
_LIPSTICK = (196, 18, 48)
_FRAME = (22, 22, 28)
_MOUTH_INSIDE = (70, 18, 26)
# Hats avoid the hues of blond and brown hair (about 20-60 degrees), so a hat never looks like hair.
_HAT_HUES = (0.0, 0.33, 0.45, 0.58, 0.66, 0.78, 0.88)


@dataclass(frozen=True)
class FaceLayout:
    """Where the parts of a face sit, in output pixels (used by the renderer and by tests)."""

    cx: float
    cy: float
    rx: float  # head half-width
    ry: float  # head half-height
    eye_dx: float  # half the distance between the eyes
    eye_y: float
    brow_y: float
    hairline_y: float
    nose_y: float
    mouth_y: float
    mouth_w: float  # half-width of a neutral mouth

    @property
    def chin_y(self) -> float:
        return self.cy + self.ry


def face_layout(nuisance: Nuisance) -> FaceLayout:
    n = nuisance
    rx, ry = 12.5 + 3.0 * n.face_width, 16.0 + 3.0 * n.face_height
    cx, cy = 32.0 + 6.0 * (n.offset_x - 0.5), 30.5 + 4.0 * (n.offset_y - 0.5)
    return FaceLayout(cx=cx, cy=cy, rx=rx, ry=ry, eye_dx=4.8 + 1.8 * n.eye_spacing,
                      eye_y=cy - 0.10 * ry, brow_y=cy - 0.30 * ry, hairline_y=cy - 0.62 * ry,
                      nose_y=cy + 0.24 * ry, mouth_y=cy + 0.52 * ry, mouth_w=3.2 + 1.3 * n.mouth_width)


def render(attributes: dict, nuisance: Nuisance | None = None, rng=None) -> np.ndarray:
    """Draw one face: (64, 64, 3) uint8. `rng` (a seed or Generator) only draws a missing nuisance."""
    attrs = check_attributes(attributes)
    if nuisance is None:
        nuisance = sample_face(np.random.default_rng(rng))[1]
    lay = face_layout(nuisance)
    pen = _Pen(_background(nuisance))
    colours = _palette(attrs, nuisance)
    _draw_body_and_back_hair(pen, attrs, nuisance, lay, colours)
    _draw_head(pen, attrs, lay, colours)
    _draw_hair_and_hat(pen, attrs, nuisance, lay, colours)
    _draw_eyes(pen, attrs, lay, colours)
    _draw_mouth(pen, attrs, lay, colours)
    if attrs["Eyeglasses"]:
        _draw_glasses(pen, lay)
    return pen.finish()


def render_batch(faces) -> np.ndarray:
    """(N, 64, 64, 3) uint8 from a list of (attributes, nuisance)."""
    return np.stack([render(attrs, nuisance) for attrs, nuisance in faces])


def sample_batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n fresh faces: images (n, 64, 64, 3) uint8 and attribute targets (n, A) float32."""
    faces = [sample_face(rng) for _ in range(n)]
    return render_batch(faces), np.stack([attribute_vector(a) for a, _ in faces])


# ---------------------------------------------------------------------------- colours


def _mix(a, b, t):
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))


def _scale(rgb, factor):
    return tuple(int(max(0, min(255, round(c * factor)))) for c in rgb)


def _hsv(h, s, v):
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


def _palette(attrs: dict, n: Nuisance) -> dict:
    if attrs["Pale_Skin"]:
        # Pale skin varies only a little, so it never meets the lightest non-pale tone.
        skin = _mix(_PALE_SKIN, (236, 214, 204), n.skin_tone)
    else:
        skin = _mix(_LIGHT_SKIN, _DARK_SKIN, n.skin_tone)
    hair_name = next((h for h in _HAIR_RGB if attrs[h]), None)
    if hair_name is None:  # bald: eyebrows and beard get a dark brown or black shade
        hair = _mix((92, 60, 40), (40, 32, 30), n.hair_shade)
    else:
        hair = _scale(_HAIR_RGB[hair_name], 0.88 + 0.24 * n.hair_shade)
    # Natural lips: darker and a little redder than the skin, so a closed mouth reads on any tone.
    lips = _LIPSTICK if attrs["Wearing_Lipstick"] else _scale(_mix(skin, (170, 60, 70), 0.45), 0.72)
    return {
        "skin": skin, "shade": _scale(skin, 0.86), "hair": hair,
        "brow": _scale(hair, 0.55 if hair_name in ("Blond_Hair", "Gray_Hair") else 0.8),
        "beard": _scale(hair, 0.85), "lips": lips,
        "hat": _hsv(_HAT_HUES[min(int(n.hat_hue * len(_HAT_HUES)), len(_HAT_HUES) - 1)], 0.75, 0.75),
        "shirt": _hsv(n.shirt_hue, 0.45, 0.55), "iris": _hsv(0.08 + 0.5 * n.iris_hue, 0.6, 0.45),
    }


def _background(n: Nuisance) -> np.ndarray:
    """(S, S) RGB image: a linear gradient between two related colours along a random direction.

    Computed at output size and repeated up: a smooth gradient needs no supersampling.
    """
    size = SIZE
    c1 = np.array(_hsv(n.bg_hue, 0.35, 0.45 + 0.45 * n.bg_value), dtype=np.float32)
    c2 = np.array(_hsv(n.bg_hue + 0.3 * (n.bg_hue_shift - 0.5), 0.35, 0.8 * (0.45 + 0.45 * n.bg_value)),
                  dtype=np.float32)
    angle = 2 * np.pi * n.bg_angle
    axis = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    t = np.cos(angle) * axis[None, :] + np.sin(angle) * axis[:, None] + 0.5  # (S, S) in ~[0, 1]
    t = np.clip(t, 0.0, 1.0)[..., None]
    small = (c1 * (1 - t) + c2 * t).astype(np.uint8)  # (64, 64, 3)
    return Image.fromarray(small, "RGB").resize((size * SUPERSAMPLE,) * 2, Image.NEAREST)


# ---------------------------------------------------------------------------- drawing


class _Pen:
    """ImageDraw in output-pixel coordinates on a SUPERSAMPLE x canvas."""

    def __init__(self, background: Image.Image):
        self.image = background
        self.draw = ImageDraw.Draw(self.image)

    @staticmethod
    def box(x0, y0, x1, y1):
        return [x0 * SUPERSAMPLE, y0 * SUPERSAMPLE, x1 * SUPERSAMPLE, y1 * SUPERSAMPLE]

    @staticmethod
    def points(pts):
        return [(x * SUPERSAMPLE, y * SUPERSAMPLE) for x, y in pts]

    @staticmethod
    def width(w):
        return max(1, int(round(w * SUPERSAMPLE)))

    def ellipse(self, cx, cy, rx, ry, fill, outline=None, width=0.0):
        self.draw.ellipse(self.box(cx - rx, cy - ry, cx + rx, cy + ry), fill=fill, outline=outline,
                          width=self.width(width) if outline else 0)

    def polygon(self, pts, fill):
        self.draw.polygon(self.points(pts), fill=fill)

    def finish(self) -> np.ndarray:
        # A box average of SUPERSAMPLE^2 samples is each pixel's exact coverage: clean anti-aliasing.
        return np.asarray(self.image.reduce(SUPERSAMPLE), dtype=np.uint8)


def _fill_head(pen, lay: FaceLayout, male: bool, fill, above_y: float | None = None):
    """Fill the head's skin area (men get a squarer jaw), or only its part above `above_y`."""
    rx = lay.rx if male else lay.rx * 0.94
    box = pen.box(lay.cx - rx, lay.cy - lay.ry, lay.cx + rx, lay.cy + lay.ry)
    if above_y is None:
        pen.draw.ellipse(box, fill=fill)
        if male:
            jaw = pen.box(lay.cx - rx * 0.93, lay.cy, lay.cx + rx * 0.93, lay.chin_y)
            pen.draw.rounded_rectangle(jaw, radius=4.5 * SUPERSAMPLE, fill=fill)
        return
    # The ellipse above a horizontal line is a chord between the two angles where they meet.
    angle = np.degrees(np.arcsin(np.clip((above_y - lay.cy) / lay.ry, -1.0, 1.0)))
    pen.draw.chord(box, 180 - angle, 360 + angle, fill=fill)
    if male and above_y > lay.cy:
        pen.draw.rectangle(pen.box(lay.cx - rx * 0.93, lay.cy, lay.cx + rx * 0.93, above_y), fill=fill)


def _draw_body_and_back_hair(pen, attrs, n, lay, col):
    if not attrs["Male"]:  # long hair behind the head, down to the shoulders
        bottom = lay.chin_y + 2.0 + 6.0 * n.hair_length
        pen.draw.rounded_rectangle(pen.box(lay.cx - lay.rx - 3.2, lay.cy - lay.ry * 0.5,
                                           lay.cx + lay.rx + 3.2, bottom), radius=5 * SUPERSAMPLE,
                                   fill=col["hair"])
    top = lay.chin_y + 5.0
    pen.ellipse(lay.cx, top + 16.0, 21.0, 16.0, fill=col["shirt"])
    neck_w = lay.rx * 0.45
    pen.draw.rectangle(pen.box(lay.cx - neck_w, lay.cy + 0.4 * lay.ry, lay.cx + neck_w, top + 2.0),
                       fill=col["shade"])
    for side in (-1, 1):  # ears
        pen.ellipse(lay.cx + side * lay.rx * 0.98, lay.eye_y + 1.5, 1.6, 2.8, fill=col["shade"])


def _draw_head(pen, attrs, lay, col):
    male = attrs["Male"]
    if not attrs["Bald"]:  # hair volume peeking out around the skull
        grow = 1.0 if male else 2.6
        pen.ellipse(lay.cx, lay.cy - 0.35 * lay.ry, lay.rx + grow, 0.65 * lay.ry + grow + 0.4,
                    fill=col["hair"])
    if attrs["Beard"]:  # the whole head in beard colour, then skin over the part above the beard
        _fill_head(pen, lay, male, col["beard"])
        pen.ellipse(lay.cx, lay.chin_y - 0.3, lay.rx * 0.55, 2.2, fill=col["beard"])  # fuller chin
        _fill_head(pen, lay, male, col["skin"], above_y=lay.nose_y + 1.2)
    else:
        _fill_head(pen, lay, male, col["skin"])
    if attrs["Bald"]:  # shine on the scalp
        pen.ellipse(lay.cx - 0.3 * lay.rx, lay.cy - 0.72 * lay.ry, 3.2, 1.6, fill=_scale(col["skin"], 1.12))
    nose = [(lay.cx, lay.eye_y + 2.0), (lay.cx - 1.3, lay.nose_y), (lay.cx + 1.3, lay.nose_y)]
    pen.polygon(nose, fill=col["shade"])


def _draw_hair_and_hat(pen, attrs, n, lay, col):
    if attrs["Bald"]:
        return
    top, hairline = lay.cy - lay.ry - 1.0, lay.hairline_y
    rx = lay.rx + (0.9 if attrs["Male"] else 1.6)
    # Cap of hair: upper half of an ellipse whose lower edge is the hairline.
    pen.draw.chord(pen.box(lay.cx - rx, top, lay.cx + rx, 2 * hairline - top), 180, 360, fill=col["hair"])
    side_bottom = lay.eye_y + (0.5 + 1.5 * n.hair_length if attrs["Male"] else 4.0)
    for side in (-1, 1):  # sideburns (men) or hair framing the face (women)
        outer, inner = lay.cx + side * (rx + 0.2), lay.cx + side * (lay.rx - (1.6 if attrs["Male"] else 2.4))
        pen.polygon([(outer, hairline - 1.5), (inner, hairline - 0.5), (inner, side_bottom - 2.0),
                     (outer, side_bottom)], fill=col["hair"])
    brim_y = hairline - 0.3
    if attrs["Bangs"]:
        _draw_bangs(pen, lay, col, top_y=brim_y if attrs["Wearing_Hat"] else hairline - 1.0)
    if attrs["Wearing_Hat"]:
        crown_top = lay.cy - lay.ry - 5.0
        hat_rx = lay.rx + 0.6
        pen.draw.chord(pen.box(lay.cx - hat_rx, crown_top, lay.cx + hat_rx, 2 * brim_y - crown_top),
                       180, 360, fill=col["hat"])
        pen.draw.rectangle(pen.box(lay.cx - lay.rx - 3.0, brim_y - 1.4, lay.cx + lay.rx + 3.0, brim_y + 1.0),
                           fill=_scale(col["hat"], 0.7))


def _draw_bangs(pen, lay, col, top_y):
    """A fringe from `top_y` down to just above the brows, with a jagged lower edge."""
    left, right = lay.cx - 0.86 * lay.rx, lay.cx + 0.86 * lay.rx
    bottom = lay.brow_y - 0.9
    teeth = 6
    edge = []
    for i in range(teeth * 2 + 1):
        x = right - (right - left) * i / (teeth * 2)
        edge.append((x, bottom if i % 2 == 0 else bottom - 1.6))
    pen.polygon([(left - 0.5, top_y), (right + 0.5, top_y)] + edge, fill=col["hair"])


def _draw_eyes(pen, attrs, lay, col):
    thick = 1.1 if attrs["Male"] else 0.7
    for side in (-1, 1):
        ex = lay.cx + side * lay.eye_dx
        pen.ellipse(ex, lay.eye_y, 1.9, 1.15, fill=(245, 245, 240))
        pen.ellipse(ex, lay.eye_y, 0.95, 0.95, fill=col["iris"])
        pen.ellipse(ex, lay.eye_y, 0.4, 0.4, fill=(15, 10, 10))
        inner, outer = ex - side * 2.0, ex + side * 2.2
        pen.draw.line(pen.points([(inner, lay.brow_y + 0.2), (ex, lay.brow_y - 0.5), (outer, lay.brow_y + 0.1)]),
                      fill=col["brow"], width=pen.width(thick), joint="curve")


def _draw_mouth(pen, attrs, lay, col):
    x, y = lay.cx, lay.mouth_y
    lips, lip_w = col["lips"], (1.5 if attrs["Wearing_Lipstick"] else 1.0)
    smile, open_ = attrs["Smiling"], attrs["Mouth_Slightly_Open"]
    w = lay.mouth_w + (1.2 if smile else 0.0)
    if attrs["Beard"]:  # bare skin around the lips, so the mouth reads as well as on a shaven face
        pen.ellipse(x, y + 0.5, w + 0.9, 2.5, fill=col["skin"])
    if smile and open_:  # a "D" lying on its back: open grin with teeth
        box = pen.box(x - w, y - 3.0, x + w, y + 3.0)
        pen.draw.chord(box, 0, 180, fill=_MOUTH_INSIDE, outline=lips, width=pen.width(lip_w))
        pen.draw.rectangle(pen.box(x - w * 0.75, y + 0.3, x + w * 0.75, y + 1.1), fill=(240, 240, 235))
    elif smile:  # a U whose corners rise well above the lips' middle
        pen.draw.arc(pen.box(x - w, y - 3.4, x + w, y + 1.4), 10, 170, fill=lips, width=pen.width(lip_w + 0.3))
    elif open_:
        pen.ellipse(x, y + 0.4, w * 0.7, 2.2, fill=_MOUTH_INSIDE, outline=lips, width=lip_w)
    else:
        pen.ellipse(x, y, w, 0.45 + lip_w * 0.45, fill=lips)


def _draw_glasses(pen, lay):
    r = 2.9
    for side in (-1, 1):
        ex = lay.cx + side * lay.eye_dx
        pen.draw.rounded_rectangle(pen.box(ex - r, lay.eye_y - r * 0.8, ex + r, lay.eye_y + r * 0.8),
                                   radius=1.2 * SUPERSAMPLE, outline=_FRAME, width=pen.width(0.9))
        arm_end = lay.cx + side * (lay.rx + 0.4)
        pen.draw.line(pen.points([(ex + side * r, lay.eye_y - 0.8), (arm_end, lay.eye_y - 1.2)]),
                      fill=_FRAME, width=pen.width(0.8))
    left, right = lay.cx - lay.eye_dx + r, lay.cx + lay.eye_dx - r
    pen.draw.line(pen.points([(left, lay.eye_y - 0.6), (right, lay.eye_y - 0.6)]), fill=_FRAME,
                  width=pen.width(0.8))
