"""Image grids with captions: what sample logs, `t2f generate` and W&B show a person.

    grid = caption_grid(images, ["a smiling woman", "a man with glasses"], per_row=4)
    grid.save("grid.png")

Images are float tensors in [-1, 1] (the generator's range). Each row of `per_row` images gets
its caption written (wrapped) under it; an optional small subcaption under every image shows,
for instance, what the recaptioner read back from that image.

Text is set in Noto Sans CJK (the `noto-cjk-sans-otc` package, found at run time, never
downloaded), which has Latin, Greek, Cyrillic, Chinese, Japanese and Korean glyphs; emoji have
none there and show as the font's empty box. A row's caption takes at most as many lines as
the image height holds (the last ends in "…"), so no caption, however long, makes a grid tall.
"""

import functools
import math
import warnings

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

_PAD = 4  # pixels around text and between rows
_BACKGROUND = (255, 255, 255)
_CAPTION_COLOUR = (0, 0, 0)
_SUBCAPTION_COLOUR = (90, 90, 90)
_SUB_LINES = 3  # subcaption lines kept under each image
_ELLIPSIS = "…"
_NOTO_FACE = 2  # Noto Sans CJK SC in the collection (JP, KR, SC, TC, HK, then the Mono faces)


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
    font = caption_font(max(10, min(32, h // 6)))
    small = caption_font(max(8, min(24, h // 8)))
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
    sub_lines = [wrap_text(s, small, w - 2 * _PAD, _SUB_LINES) for s in subs] if subs is not None else []
    sub_height = max((len(lines) for lines in sub_lines), default=0) * line_height(small)
    # Never taller than the images above it: a runaway caption must not make a runaway grid.
    cap_lines = wrap_text(caption, font, width - 2 * _PAD, max(2, h // line_height(font)))
    cap_height = len(cap_lines) * line_height(font)
    block = Image.new("RGB", (width, h + sub_height + cap_height + 2 * _PAD), _BACKGROUND)
    draw = ImageDraw.Draw(block)
    for i, cell in enumerate(cells):
        block.paste(Image.fromarray(cell), (i * w, 0))
        for j, line in enumerate(sub_lines[i] if sub_lines else []):
            draw.text((i * w + _PAD, h + _PAD // 2 + j * line_height(small)), line, fill=_SUBCAPTION_COLOUR, font=small)
    for j, line in enumerate(cap_lines):
        draw.text((_PAD, h + sub_height + _PAD + j * line_height(font)), line, fill=_CAPTION_COLOUR, font=font)
    return block


def wrap_text(text: str, font, max_width: int, max_lines: int) -> list[str]:
    """Greedy word wrap by rendered width into at most `max_lines` lines, the last ending in "…"
    when text is left over. A word wider than a line (or a run of CJK, which has no spaces) is
    cut by characters."""
    lines, line = [], ""
    for word in str(text).split():
        candidate = f"{line} {word}" if line else word
        if font.getlength(candidate) <= max_width:
            line = candidate
            continue
        if line:
            lines.append(line)
        while font.getlength(word) > max_width and len(word) > 1 and len(lines) < max_lines:
            cut = _fitting_prefix(word, font, max_width)
            lines.append(word[:cut])
            word = word[cut:]
        line = word
        if len(lines) >= max_lines:
            return _ellipsise(lines[:max_lines], font, max_width)
    if line:
        lines.append(line)
    return lines or [""]


def _fitting_prefix(word: str, font, max_width: int) -> int:
    """Length of the longest prefix of `word` that fits in max_width (at least 1); binary search."""
    lo, hi = 1, len(word)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if font.getlength(word[:mid]) <= max_width:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _ellipsise(lines: list[str], font, max_width: int) -> list[str]:
    """Mark the last line as cut, dropping its end until the mark fits."""
    last = lines[-1]
    while last and font.getlength(last + " " + _ELLIPSIS) > max_width:
        last = last[:-1]
    return lines[:-1] + [(last.rstrip() + " " + _ELLIPSIS).lstrip()]


def line_height(font) -> int:
    ascent, descent = font.getmetrics()  # the font's own extent, so CJK and accents fit too
    return int(ascent + descent) + 2


@functools.lru_cache(maxsize=8)
def caption_font(size: int):
    """Noto Sans CJK at `size` px from its pip package; Pillow's own font if that is missing."""
    try:
        import noto_cjk_sans_otc

        return ImageFont.truetype(str(noto_cjk_sans_otc.FONT_PATH), size, index=_NOTO_FACE)
    except (ImportError, OSError) as err:
        warnings.warn(f"caption font unavailable ({err}); captions outside Latin script will show as boxes. "
                      "Install it with `pip install noto-cjk-sans-otc`.", stacklevel=2)
    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled scalable font (Latin only)
    except TypeError:  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()
