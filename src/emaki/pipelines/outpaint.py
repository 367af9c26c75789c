"""Outpainting: extend the canvas in any direction and let inpainting fill the new area.

The "infinite image" idea (Runway; A1111's "Poor man's outpainting" script): place the image on a
larger canvas, pre-fill the new border from the colours at the image's edge, mask the border
plus a strip ``overlap`` pixels into the original (so the seam itself is repainted, not just
abutted), blur the mask, and run an ordinary inpainting job over the whole canvas. The overlay
restores the original exactly outside the feathered strip. Outpainting again from the result
extends the image indefinitely.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from PIL import Image

from emaki.errors import InvalidRequestError
from emaki.request import GenerationRequest, InitImage


@dataclass(frozen=True)
class Outpaint:
    """Pixels to add on each side (multiples of 8), and how the seam is made."""

    left: int = 0
    right: int = 0
    top: int = 0
    bottom: int = 0
    overlap: int = 8  #: pixels of the original repainted along each extended edge
    mask_blur: int = 8
    masked_content: int = 0  #: A1111's masked content for the new area (0 fill)

    def validate(self) -> None:
        sides = (self.left, self.right, self.top, self.bottom)
        if any(not isinstance(v, int) or v < 0 or v % 8 for v in sides):
            raise InvalidRequestError(
                f"outpainting sizes must be non-negative multiples of 8, got {sides}"
            )
        if not any(sides):
            raise InvalidRequestError("outpainting needs at least one side to extend")
        if self.overlap < 0 or self.mask_blur < 0:
            raise InvalidRequestError("outpainting overlap and mask blur must be 0 or more")


def outpaint_canvas(image: Image.Image, spec: Outpaint) -> tuple[Image.Image, Image.Image]:
    """(canvas, mask): the image placed on the larger canvas and the area to paint (white)."""
    spec.validate()
    image = image.convert("RGB")
    w = image.width + spec.left + spec.right
    h = image.height + spec.top + spec.bottom
    canvas = Image.new("RGB", (w, h), (127, 127, 127))
    canvas.paste(image, (spec.left, spec.top))
    mask = Image.new("L", (w, h), 255)
    keep = (
        spec.left + (spec.overlap if spec.left else 0),
        spec.top + (spec.overlap if spec.top else 0),
        spec.left + image.width - (spec.overlap if spec.right else 0),
        spec.top + image.height - (spec.overlap if spec.bottom else 0),
    )
    if keep[2] <= keep[0] or keep[3] <= keep[1]:
        raise InvalidRequestError("the overlap is larger than the image")
    mask.paste(0, keep)
    return canvas, mask


def outpaint_request(
    request: GenerationRequest, image: Image.Image, spec: Outpaint
) -> GenerationRequest:
    """An inpainting request over the extended canvas (size = the canvas, whole picture)."""
    canvas, mask = outpaint_canvas(image, spec)
    if canvas.width % 8 or canvas.height % 8:
        raise InvalidRequestError(
            f"the outpainted canvas {canvas.width}x{canvas.height} is not a multiple of 8; "
            "crop or resize the image to a multiple of 8 first"
        )
    init = InitImage(
        canvas, mask=mask, mask_blur=spec.mask_blur, inpainting_fill=spec.masked_content
    )
    return replace(request, init=init, width=canvas.width, height=canvas.height)
