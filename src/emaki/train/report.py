"""Training reports drawn with Pillow: the loss-curve PNG and labelled image grids.

Pillow is already a dependency; a plotting library would add tens of MB for two simple pictures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from emaki.models.files import atomic_write_file


def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def smooth(values: Sequence[float], alpha: float = 0.05) -> list[float]:
    """Exponential moving average with bias correction (as TensorBoard's smoothing)."""
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        avg = (1 - alpha) * avg + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


def loss_curve_png(
    steps: Sequence[int],
    losses: Sequence[float],
    path: Path,
    title: str = "loss",
    size: tuple[int, int] = (720, 400),
) -> None:
    """Plot raw (light) and smoothed (dark) loss against step, log-scaled when it spans a decade."""
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = _font(12)
    left, right, top, bottom = 64, 16, 28, 36
    d.text((left, 6), title, fill="black", font=font)
    pts = [(s, v) for s, v in zip(steps, losses) if math.isfinite(v)]
    if len(pts) >= 2:
        xs = [s for s, _ in pts]
        ys = [v for _, v in pts]
        use_log = min(ys) > 0 and max(ys) / min(ys) > 10
        tr = (lambda v: math.log10(v)) if use_log else (lambda v: v)
        ty = [tr(v) for v in ys]
        y0, y1 = min(ty), max(ty)
        if y1 - y0 < 1e-12:
            y0, y1 = y0 - 1, y1 + 1
        x0, x1 = min(xs), max(xs)
        x1 = x1 if x1 > x0 else x0 + 1

        def px(s: float, v: float) -> tuple[float, float]:
            return (
                left + (s - x0) / (x1 - x0) * (w - left - right),
                top + (1 - (v - y0) / (y1 - y0)) * (h - top - bottom),
            )

        d.rectangle([left, top, w - right, h - bottom], outline=(180, 180, 180))
        for k in range(5):
            v = y0 + (y1 - y0) * k / 4
            _, yy = px(x0, v)
            d.line([left, yy, w - right, yy], fill=(235, 235, 235))
            label = f"{10**v:.3g}" if use_log else f"{v:.3g}"
            d.text((4, yy - 6), label, fill="black", font=font)
        for k in range(5):
            s = x0 + (x1 - x0) * k / 4
            xx, _ = px(s, y0)
            d.text((xx - 10, h - bottom + 6), f"{int(s)}", fill="black", font=font)
        d.line([px(s, v) for s, v in zip(xs, ty)], fill=(170, 200, 235), width=1)
        # Smooth over about a tenth of the points, so short and long runs both read well.
        alpha = min(0.5, max(0.01, 10 / len(ty)))
        d.line([px(s, v) for s, v in zip(xs, smooth(ty, alpha))], fill=(20, 60, 160), width=2)
        d.text((w - right - 40, 6), "step", fill="black", font=font)
    else:
        d.text((left, h // 2), "not enough points yet", fill="black", font=font)
    _save_png(img, path)


def image_grid(
    images: Sequence[Image.Image],
    labels: Sequence[str] | None = None,
    cols: int | None = None,
    cell: int | None = None,
) -> Image.Image:
    """Images in a grid, each with its label (wrapped) under it."""
    if not images:
        raise ValueError("no images for the grid")
    n = len(images)
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    cell = cell or max(im.width for im in images)
    font = _font(11)
    label_h = 30 if labels else 0
    grid = Image.new("RGB", (cols * cell, rows * (cell + label_h)), "white")
    d = ImageDraw.Draw(grid)
    chars = max(8, cell // 6)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        x, y = c * cell, r * (cell + label_h)
        grid.paste(im.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        if labels:
            text = labels[i]
            lines = [text[k : k + chars] for k in range(0, min(len(text), 2 * chars), chars)]
            for j, line in enumerate(lines):
                d.text((x + 2, y + cell + 2 + 13 * j), line, fill="black", font=font)
    return grid


def _save_png(img: Image.Image, path: Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_file(Path(path), lambda tmp: img.save(tmp, format="PNG"), overwrite=True)


def save_grid(
    images: Sequence[Image.Image], labels: Sequence[str] | None, path: Path, cols: int | None = None
) -> None:
    _save_png(image_grid(images, labels, cols), path)
