"""Labelled image grids: column labels on top, row labels on the left, as A1111 draws them."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: object, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split(" "):
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def labelled_grid(
    cells: list[list[Image.Image]],
    col_labels: list[str],
    row_labels: list[str],
    *,
    title: str = "",
) -> Image.Image:
    """``cells[row][col]`` pasted on a white sheet with the labels (empty labels: no margin)."""
    rows, cols = len(cells), len(cells[0])
    w = max(im.width for r in cells for im in r)
    h = max(im.height for r in cells for im in r)
    font_size = max(12, w // 12)
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = font_size + 4
    top = 0
    if any(col_labels):
        top = line * max(len(_wrap(probe, t, font, w - 8)) for t in col_labels) + 8
    left = 0
    if any(row_labels):
        left = min(int(max(probe.textlength(t, font=font) for t in row_labels)) + 16, 2 * w)
    title_h = line + 8 if title else 0
    sheet = Image.new("RGB", (left + cols * w, title_h + top + rows * h), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((8, 4), title, fill="black", font=font)
    for c, text in enumerate(col_labels):
        for i, part in enumerate(_wrap(draw, text, font, w - 8)):
            x = left + c * w + (w - draw.textlength(part, font=font)) / 2
            draw.text((x, title_h + 4 + i * line), part, fill="black", font=font)
    for r, text in enumerate(row_labels):
        parts = _wrap(draw, text, font, left - 16) if left else []
        y0 = title_h + top + r * h + (h - len(parts) * line) / 2
        for i, part in enumerate(parts):
            draw.text((8, y0 + i * line), part, fill="black", font=font)
    for r, row in enumerate(cells):
        for c, im in enumerate(row):
            sheet.paste(im.convert("RGB"), (left + c * w, title_h + top + r * h))
    return sheet
