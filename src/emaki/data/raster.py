"""SVG rasterization for dataset building: resvg first, cairosvg for the files resvg rejects.

resvg (PyPI ``resvg-py``, a self-contained wheel) renders the icon sets in 2–3 ms per image;
some older clipart files are rejected by it and render with cairosvg (Debian's libcairo2).
Transparent images are composited on white, the way emoji are shown and the way the model sees
them.
"""

from __future__ import annotations

import io
import re

from PIL import Image

from emaki.data.sources import DataError

_VIEWBOX_RE = re.compile(
    r'viewBox\s*=\s*["\']\s*([-\d.eE+]+)[\s,]+([-\d.eE+]+)[\s,]+([-\d.eE+]+)[\s,]+([-\d.eE+]+)'
)


def iconify_svg(body: str, left: float, top: float, width: float, height: float) -> str:
    """Wrap an Iconify icon body in a standalone ``<svg>`` with its own view box.

    Iconify bodies use ``xlink:href``, so the wrapper declares the ``xlink`` namespace.
    """
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
        f'viewBox="{left:g} {top:g} {width:g} {height:g}" width="{width:g}" height="{height:g}">'
        f"{body}</svg>"
    )


def svg_aspect(svg: str) -> float:
    """Width / height of an SVG from its view box (1.0 when it has none)."""
    m = _VIEWBOX_RE.search(svg[:4000])
    if m:
        w, h = float(m.group(3)), float(m.group(4))
        if w > 0 and h > 0:
            return w / h
    return 1.0


def _render_resvg(svg: str, width: int, height: int) -> bytes:
    import resvg_py

    data = resvg_py.svg_to_bytes(svg_string=svg, width=width, height=height)
    return bytes(data)


def _render_cairo(svg: str, width: int, height: int) -> bytes:
    import cairosvg

    return cairosvg.svg2png(
        bytestring=svg.encode("utf-8"), output_width=width, output_height=height, unsafe=False
    )


# The renderers render_svg tries, in order, each with the module it imports: one table, so that
# require_svg_renderer checks exactly the modules that render_svg uses.
_RENDERERS = (("resvg_py", _render_resvg), ("cairosvg", _render_cairo))
SVG_RENDERERS = tuple(module for module, _ in _RENDERERS)


def require_svg_renderer() -> None:
    """Raise a clear error when neither SVG renderer (resvg-py, cairosvg) is installed.

    Checked once before a build that renders SVGs, so that a missing install step is one message
    instead of every item of every source skipped for the same reason.
    """
    import importlib.util

    if not any(importlib.util.find_spec(m) for m in SVG_RENDERERS):
        raise DataError(
            "no SVG renderer is installed (resvg-py or cairosvg); the open sources are SVG: "
            "run the build through bin/emaki, which installs emaki's train extra, "
            "or pip install 'emaki[train]'"
        )


def render_svg(
    svg: str, max_side: int, background: tuple[int, int, int] = (255, 255, 255)
) -> Image.Image:
    """Render an SVG so that its longer side is ``max_side`` pixels; RGB on ``background``."""
    aspect = svg_aspect(svg)
    if aspect >= 1:
        width, height = max_side, max(1, round(max_side / aspect))
    else:
        width, height = max(1, round(max_side * aspect)), max_side
    errors = []
    for _, render in _RENDERERS:
        try:
            png = render(svg, width, height)
            img = Image.open(io.BytesIO(png))
            img.load()
            break
        except ImportError as e:
            errors.append(f"{render.__name__[8:]} not installed ({e.name})")
        except Exception as e:  # both renderers raise their own exception types on bad SVG
            errors.append(
                f"{render.__name__[8:]}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            )
    else:
        raise DataError("could not render SVG: " + "; ".join(errors))
    if img.size != (width, height):  # renderers may round the other side differently
        img = img.resize((width, height), Image.Resampling.LANCZOS)
    return flatten(img, background)


def flatten(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Composite an image with transparency onto a solid background; RGB out."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return img.convert("RGB")
