"""Image grids with captions: what sample logs, `t2f generate` and W&B show a person.

    grid = caption_grid(images, ["a smiling woman", "a man with glasses"], per_row=4)
    grid.save("grid.png")

Images are float tensors in [-1, 1] (the generator's range). Each row of `per_row` images gets
its caption written (wrapped) under it; an optional small subcaption under every image shows,
for instance, what the recaptioner read back from that image.
"""

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

_PAD = 4  # pixels around text and between rows
_BACKGROUND = (255, 255, 255)
_CAPTION_COLOUR = (0, 0, 0)
_SUBCAPTION_COLOUR = (90, 90, 90)
_SUB_LINES = 3  # subcaption lines kept under each image


def to_uint8(images) -> np.ndarray:
    """(N, 3, H, W) floats in [-1, 1] (tensor or array) -> (N, H, W, 3) uint8, rounded."""
    x = torch.as_tensor(images).detach().float().cpu()
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(x.shape)}")
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (N, C, H, W)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, 3)


def caption_grid(images, captions: list[str], per_row: int, subcaptions: list[str] | None = None) -> Image.Image:
    """A PIL image: rows of `per_row` images, each row's caption wrapped under it.

    `captions` holds one caption per row (or one per image, then the row's first is shown);
    `subcaptions`, when given, holds one short text per image, drawn small under that image.
    """
    pixels = to_uint8(images)  # (N, H, W, 3)
    n, h, w, _ = pixels.shape
    if per_row < 1:
        raise ValueError(f"per_row must be >= 1, got {per_row}")
    rows = math.ceil(n / per_row)
    row_captions = _row_captions(captions, n, rows, per_row)
    if subcaptions is not None and len(subcaptions) != n:
        raise ValueError(f"got {len(subcaptions)} subcaptions for {n} images (need one per image)")

    width = per_row * w
    font = _font(max(10, min(32, h // 6)))
    small = _font(max(8, min(24, h // 8)))
    blocks = []
    for r in range(rows):
        cells = pixels[r * per_row:(r + 1) * per_row]
        subs = subcaptions[r * per_row:(r + 1) * per_row] if subcaptions is not None else None
        blocks.append(_row_block(cells, width, row_captions[r], subs, font, small))
    grid = Image.new("RGB", (width, sum(b.height for b in blocks)), _BACKGROUND)
    y = 0
    for block in blocks:
        grid.paste(block, (0, y))
        y += block.height
    return grid


def _row_captions(captions, n: int, rows: int, per_row: int) -> list[str]:
    captions = list(captions)
    if len(captions) == rows:
        return captions
    if len(captions) == n:
        return [captions[r * per_row] for r in range(rows)]
    raise ValueError(f"got {len(captions)} captions for {n} images in {rows} rows (need one per row or one per image)")


def _row_block(cells: np.ndarray, width: int, caption: str, subs, font, small) -> Image.Image:
    """One row: the images, their subcaptions, then the row caption, on a white strip."""
    h, w = cells.shape[1:3]
    sub_lines = [_clip(_wrap(s, small, w - 2 * _PAD)) for s in subs] if subs is not None else []
    sub_height = max((len(lines) for lines in sub_lines), default=0) * _line_height(small)
    cap_lines = _wrap(caption, font, width - 2 * _PAD)
    cap_height = len(cap_lines) * _line_height(font)
    block = Image.new("RGB", (width, h + sub_height + cap_height + 2 * _PAD), _BACKGROUND)
    draw = ImageDraw.Draw(block)
    for i, cell in enumerate(cells):
        block.paste(Image.fromarray(cell), (i * w, 0))
        for j, line in enumerate(sub_lines[i] if sub_lines else []):
            draw.text((i * w + _PAD, h + _PAD // 2 + j * _line_height(small)), line, fill=_SUBCAPTION_COLOUR, font=small)
    for j, line in enumerate(cap_lines):
        draw.text((_PAD, h + sub_height + _PAD + j * _line_height(font)), line, fill=_CAPTION_COLOUR, font=font)
    return block


def _wrap(text: str, font, max_width: int) -> list[str]:
    """Greedy word wrap by rendered width; a single over-long word is cut by characters."""
    lines, line = [], ""
    for word in str(text).split():
        candidate = f"{line} {word}" if line else word
        if font.getlength(candidate) <= max_width:
            line = candidate
            continue
        if line:
            lines.append(line)
        while font.getlength(word) > max_width and len(word) > 1:
            cut = max(1, next((k for k in range(len(word), 0, -1) if font.getlength(word[:k]) <= max_width), 1))
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    if line:
        lines.append(line)
    return lines or [""]


def _clip(lines: list[str]) -> list[str]:
    """At most _SUB_LINES lines under an image (a runaway decoder can write a paragraph)."""
    return lines if len(lines) <= _SUB_LINES else lines[: _SUB_LINES - 1] + [lines[_SUB_LINES - 1] + " ..."]


def _line_height(font) -> int:
    top, bottom = font.getbbox("Ag")[1::2]
    return int(bottom - top) + 3


def _font(size: int):
    # Pillow's bundled scalable font: no system font files needed on a bare cluster node.
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()
