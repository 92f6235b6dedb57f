"""The show-attend-tell figure: where the recaptioner looked on a face for each word it read.

    reading = pipeline.read_back_with_attention(images[:1])[0]
    attention_figure(images[0], reading.words, reading.attention, title=reading.text).save("attention.png")

The first panel is the face itself; then one panel per word, the face lit where the decoder's
soft attention β_k rested when it chose word k and dimmed elsewhere, the word written under it
(as in Xu et al., 2015, figure 2). The attention over the L = g×g feature grid is upsampled
smoothly to the panel, and each word's map is scaled to its own maximum: β_k sums to 1 over the
grid, so unscaled maps of a 14×14 grid would all look black.
"""

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from t2f.visual import caption_font, line_height, to_uint8, wrap_text

PANEL = 128  # pixels per panel side: toy faces are 64 px, so they are shown enlarged
PER_ROW = 6
GAP = 4  # white pixels between panels
DIM = 0.2  # brightness where the decoder did not look (1 = where it looked most)
FACE_LABEL = "face"
_BACKGROUND = (255, 255, 255)
_TEXT = (0, 0, 0)


def attention_grid(attention) -> np.ndarray:
    """(T, L) or (T, g, g) attention as (T, g, g) float32 maps, g² = L, values as they are."""
    maps = torch.as_tensor(attention).detach().float().cpu()
    maps = maps.flatten(1) if maps.ndim == 3 else maps  # (T, L)
    side = math.isqrt(maps.shape[-1]) if maps.ndim == 2 else 0
    if maps.ndim != 2 or side == 0 or side * side != maps.shape[1]:
        raise ValueError(f"expected attention of shape (words, L) over a square grid of L positions, got {tuple(maps.shape)}")
    return maps.numpy().reshape(len(maps), side, side)  # (T, g, g), row-major like the encoder's flatten


def attention_panels(image, attention, panel: int = PANEL) -> list[np.ndarray]:
    """The face, then the face lit by each word's attention: (panel, panel, 3) uint8 arrays.

    `image` is (3, H, W) in [-1, 1] (the generator's range) or (H, W, 3) uint8; `attention` is
    (T, L) with L a square (the recaptioner's feature grid), or (T, g, g).
    """
    face = _face(image).resize((panel, panel), Image.LANCZOS)
    pixels = np.asarray(face, dtype=np.float32) / 255.0  # (P, P, 3)
    panels = [np.asarray(face)]
    for grid in attention_grid(attention):
        light = _upsampled(grid, panel)  # (P, P) in [0, 1]
        lit = pixels * (DIM + (1.0 - DIM) * light[..., None])  # (P, P, 3)
        panels.append((lit * 255.0).round().clip(0, 255).astype(np.uint8))
    return panels


def attention_figure(image, words: list[str], attention, panel: int = PANEL, per_row: int = PER_ROW,
                     title: str | None = None) -> Image.Image:
    """The figure as a PIL image: rows of `per_row` panels (face first), each labelled under it."""
    panels = attention_panels(image, attention, panel)
    if len(panels) - 1 != len(words):
        raise ValueError(f"got {len(words)} words for {len(panels) - 1} attention maps (need one map per word)")
    font = caption_font(max(12, panel // 9))
    label_height = line_height(font) + GAP
    title_lines = wrap_text(title, font, per_row * (panel + GAP), 2) if title else []
    top = len(title_lines) * line_height(font) + (GAP if title_lines else 0)
    columns, rows = min(per_row, len(panels)), math.ceil(len(panels) / per_row)
    size = (columns * panel + (columns + 1) * GAP, top + rows * (panel + label_height) + GAP)
    figure = Image.new("RGB", size, _BACKGROUND)
    draw = ImageDraw.Draw(figure)
    for j, line in enumerate(title_lines):
        draw.text((GAP, GAP + j * line_height(font)), line, fill=_TEXT, font=font)
    for index, (pixels, label) in enumerate(zip(panels, [FACE_LABEL, *words])):
        x, y = panel_origin(index, panel, per_row, top)
        figure.paste(Image.fromarray(pixels), (x, y))
        text = wrap_text(label, font, panel, 1)[0]  # a word wider than its panel is cut with "…"
        draw.text((x + (panel - font.getlength(text)) / 2, y + panel + GAP // 2), text, fill=_TEXT, font=font)
    return figure


def panel_origin(index: int, panel: int = PANEL, per_row: int = PER_ROW, top: int = 0) -> tuple[int, int]:
    """Top-left pixel of panel `index` (0 = the face) in a figure whose panels start at `top`."""
    font = caption_font(max(12, panel // 9))
    row, column = divmod(index, per_row)
    return GAP + column * (panel + GAP), top + GAP + row * (panel + line_height(font) + GAP)


def _face(image) -> Image.Image:
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3:
        return Image.fromarray(image)
    return Image.fromarray(to_uint8(torch.as_tensor(image)[None])[0])  # (H, W, 3)


def _upsampled(grid: np.ndarray, size: int) -> np.ndarray:
    """A (g, g) map as a smooth (size, size) light map in [0, 1], its peak at 1."""
    big = np.asarray(Image.fromarray(grid.astype(np.float32)).resize((size, size), Image.BICUBIC))
    big = np.clip(big, 0.0, None)  # bicubic overshoots below zero next to a sharp peak
    peak = float(big.max())
    return big / peak if peak > 0 else np.zeros_like(big)
