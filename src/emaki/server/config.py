"""Server settings and the request limits checked before any work or allocation."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from emaki.errors import InvalidRequestError
from emaki.request import GenerationRequest


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. The pixel budget counts every image of the job at its
    largest size (the hires size when hires fix is on)."""

    max_pixels: int = 1024 * 1024 * 4  #: width x height x batch size x n_iter
    max_steps: int = 150
    max_prompt_chars: int = 20_000
    max_upload_bytes: int = 20 * 1024 * 1024  #: the whole request body
    max_image_pixels: int = 4096 * 4096  #: an uploaded image, from its header
    max_queued: int = 1000

    def check(self, request: GenerationRequest, native: int) -> None:
        """Raise InvalidRequestError (a 4xx) for a request over the limits."""
        if len(request.prompt) + len(request.negative_prompt) > self.max_prompt_chars:
            raise InvalidRequestError(
                f"the prompts are longer than {self.max_prompt_chars} characters"
            )
        w, h = request.width or native, request.height or native
        if request.init is not None and (request.width is None or request.height is None):
            w, h = request.init.image.size
        scale = 1.0
        steps = request.steps
        if request.hires is not None:
            hr = request.hires
            if hr.resize_x or hr.resize_y:
                scale = max(hr.resize_x / max(w, 1), hr.resize_y / max(h, 1), 1.0) ** 2
            else:
                scale = hr.scale**2
            steps += hr.steps or request.steps
        pixels = int(w * h * scale) * request.batch_size * request.n_iter
        if pixels > self.max_pixels:
            raise InvalidRequestError(
                f"the job asks for {pixels} pixels (width x height x batch x count), more than "
                f"this server's {self.max_pixels}"
            )
        if steps > self.max_steps:
            raise InvalidRequestError(f"{steps} steps is more than this server's {self.max_steps}")


@dataclass(frozen=True)
class ServerConfig:
    """Where the server keeps its state and whom it serves."""

    home: Path  #: jobs.db, uploads/ and outputs/ live here
    host: str = "127.0.0.1"
    port: int = 7860
    token: str | None = None
    limits: Limits = Limits()

    @property
    def db(self) -> Path:
        return self.home / "jobs.db"

    @property
    def uploads(self) -> Path:
        return self.home / "uploads"

    @property
    def outputs(self) -> Path:
        return self.home / "outputs"

    def check_exposure(self) -> None:
        """Binding beyond loopback needs a token: refuse to start otherwise."""
        if self.token is None and not is_loopback(self.host):
            raise InvalidRequestError(
                f"refusing to serve on {self.host} without an auth token: anyone who can reach "
                "this address could use the server. Pass --token (or bind 127.0.0.1)"
            )
        if self.token is not None and len(self.token) < 8:
            raise InvalidRequestError("the auth token must have at least 8 characters")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
