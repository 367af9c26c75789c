"""Outpainting on a tiny model: canvas, mask, the original kept, the seam repainted."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from emaki.errors import InvalidRequestError
from emaki.models.tiny import make_tiny_bundle
from emaki.pipelines.outpaint import Outpaint, outpaint_canvas, outpaint_request
from emaki.pipelines.txt2img import Pipeline
from emaki.request import GenerationRequest


@pytest.fixture(scope="module")
def pipe():
    return Pipeline(make_tiny_bundle("sd1", seed=0))


def _image() -> Image.Image:
    y, x = np.mgrid[0:64, 0:64] / 64
    return Image.fromarray((np.stack([x, y, 1 - x], -1) * 255).astype(np.uint8), "RGB")


def test_canvas_and_mask_geometry() -> None:
    canvas, mask = outpaint_canvas(_image(), Outpaint(left=16, top=8, overlap=4))
    assert canvas.size == (80, 72) and mask.size == (80, 72)
    m = np.asarray(mask)
    assert (m[:8] == 255).all() and (m[:, :16] == 255).all()  # the new border
    assert (m[:, 16:20] == 255).all() and (m[8:12] == 255).all()  # the overlap strip
    assert (m[12:, 20:] == 0).all()  # the rest of the original is kept
    assert np.array_equal(np.asarray(canvas)[8:, 16:], np.asarray(_image()))


def test_outpainting_keeps_the_original_and_paints_the_border(pipe) -> None:
    spec = Outpaint(right=32, overlap=8, mask_blur=4)
    req = outpaint_request(
        GenerationRequest("x", steps=4, seed=2, denoising_strength=0.9), _image(), spec
    )
    out = np.asarray(pipe.generate(req).images[0], dtype=np.int16)
    assert out.shape == (64, 96, 3)
    original = np.asarray(_image(), dtype=np.int16)
    far = 64 - 8 - 11  # overlap, then the feather (2.5 sigma of blur plus rounding)
    assert np.array_equal(out[:, :far], original[:, :far])
    border = out[:, 72:]
    assert border.std() > 2  # painted, not a flat fill
    # the seam is no harder an edge than the generated border's own columns
    seam = np.abs(out[:, 55] - out[:, 56]).mean()
    inner = np.mean([np.abs(out[:, i] - out[:, i + 1]).mean() for i in range(72, 95)])
    assert seam < 2 * inner + 4


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        (Outpaint(), "at least one side"),
        (Outpaint(left=5), "multiples of 8"),
        (Outpaint(left=8, right=8, overlap=40), "overlap is larger"),
    ],
)
def test_bad_outpaint_specs(spec, needle) -> None:
    with pytest.raises(InvalidRequestError, match=needle):
        outpaint_canvas(_image(), spec)
