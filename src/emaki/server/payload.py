"""Requests as JSON for the job queue, with images kept as files in the upload folder.

A queued job must survive a restart, so its :class:`~emaki.request.GenerationRequest` is stored
as plain JSON; init images and masks are stored once each in the upload folder, named by the
SHA-256 of their PNG bytes, and referred to by that name. Names are checked to be exactly that
(64 hex digits + ``.png``), so a payload can never point outside the folder.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from PIL import Image

from emaki.errors import InvalidRequestError
from emaki.imageio import decode_image, png_bytes, read_image, write_atomic
from emaki.request import (
    ControlNetUnit,
    GenerationRequest,
    HiresFix,
    InitImage,
    RegionPrompt,
    TiledDiffusion,
)

_NAME = re.compile(r"^[0-9a-f]{64}\.png$")


class Uploads:
    """Content-addressed storage of the images that requests carry."""

    def __init__(self, folder: Path, *, max_pixels: int, max_bytes: int) -> None:
        self.folder = Path(folder)
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes

    def decode_base64(self, text: str, what: str) -> Image.Image:
        """An image from base64 (a ``data:image/...;base64,`` prefix is allowed), size-checked
        before decoding: the encoded length against ``max_bytes``, the header against pixels."""
        if not isinstance(text, str):
            raise InvalidRequestError(f"{what} must be a base64 string")
        if text.startswith("data:"):
            text = text.partition(",")[2]
        if len(text) * 3 // 4 > self.max_bytes:
            raise InvalidRequestError(f"{what} is larger than {self.max_bytes} bytes")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequestError(f"{what} is not valid base64") from None
        try:
            return decode_image(data, max_pixels=self.max_pixels, what=what)
        except Exception as e:  # InfotextError: report as a bad request
            raise InvalidRequestError(str(e)) from None

    def put(self, image: Image.Image) -> str:
        data = png_bytes(
            image if image.mode in ("RGB", "RGBA", "L") else image.convert("RGBA"), None
        )
        name = hashlib.sha256(data).hexdigest() + ".png"
        path = self.folder / name
        if not path.exists():
            write_atomic(path, data)
        return name

    def get(self, name: str) -> Image.Image:
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidRequestError(f"not an upload name: {name!r}")
        return read_image(self.folder / name)


_IMAGE_FIELDS = ("image", "mask")


def request_to_payload(request: GenerationRequest, uploads: Uploads) -> dict[str, Any]:
    """A JSON-ready dict of the request; images replaced by upload names."""
    data = asdict(request)
    if request.init is not None:
        init = data["init"]
        for key in _IMAGE_FIELDS:
            image = getattr(request.init, key)
            init[key] = uploads.put(image) if image is not None else None
    if data.get("seed_resize_from") is not None:
        data["seed_resize_from"] = list(data["seed_resize_from"])
    if request.tiled is not None:
        data["tiled"]["regions"] = [
            {"prompt": g.prompt, "box": list(g.box) if g.box is not None else None,
             "mask": uploads.put(g.mask) if g.mask is not None else None}
            for g in request.tiled.regions
        ]  # fmt: skip
    if request.control:
        data["control"] = [
            {**{f.name: getattr(u, f.name) for f in fields(u)}, "image": uploads.put(u.image)}
            for u in request.control
        ]
    return data


def request_from_payload(data: dict[str, Any], uploads: Uploads) -> GenerationRequest:
    """The request a payload describes (unknown keys are an error: payloads are ours)."""
    data = dict(data)
    init = data.pop("init", None)
    hires = data.pop("hires", None)
    tiled = data.pop("tiled", None)
    control = data.pop("control", None) or ()
    known = {f.name for f in fields(GenerationRequest)}
    unknown = set(data) - known
    if unknown:
        raise InvalidRequestError(f"unknown request fields: {', '.join(sorted(unknown))}")
    if data.get("seed_resize_from") is not None:
        data["seed_resize_from"] = tuple(data["seed_resize_from"])
    request = GenerationRequest(**data)
    if init is not None:
        init = dict(init)
        for key in _IMAGE_FIELDS:
            if init.get(key) is not None:
                init[key] = uploads.get(init[key])
        request = _replace(request, init=InitImage(**init))
    if hires is not None:
        request = _replace(request, hires=HiresFix(**hires))
    if control:
        if not isinstance(control, list | tuple) or not all(isinstance(c, dict) for c in control):
            raise InvalidRequestError("control must be a list of ControlNet unit objects")
        units = [ControlNetUnit(**{**c, "image": uploads.get(c.get("image"))}) for c in control]
        request = _replace(request, control=tuple(units))
    if tiled is not None:
        if not isinstance(tiled, dict):
            raise InvalidRequestError("tiled must be an object")
        regions = []
        for g in tiled.get("regions") or ():
            if not isinstance(g, dict):
                raise InvalidRequestError("each region is an object with a prompt and a box")
            box = tuple(g["box"]) if g.get("box") is not None else None
            mask = uploads.get(g["mask"]) if g.get("mask") is not None else None
            regions.append(RegionPrompt(str(g.get("prompt", "")), box=box, mask=mask))
        rest = {k: v for k, v in tiled.items() if k != "regions"}
        request = _replace(request, tiled=TiledDiffusion(**rest, regions=tuple(regions)))
    return request


def _replace(request: GenerationRequest, **kw: Any) -> GenerationRequest:
    from dataclasses import replace

    return replace(request, **kw)
