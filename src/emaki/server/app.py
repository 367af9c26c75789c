"""The FastAPI application: native job routes, A1111-compatible routes, the web page.

Every route but the page's static files needs the token when the server has one (``Bearer``
header, HTTP Basic with the token as password as A1111's ``--api-auth`` clients send it, or
``?token=`` for the websocket). State-changing requests from another origin are refused.
Request bodies over the upload limit are refused from their ``Content-Length`` before they are
read. Every rejection is a 4xx with ``{"detail": message}``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, HTTPException, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from emaki import __version__
from emaki.errors import EmakiError, InvalidRequestError
from emaki.request import GenerationRequest
from emaki.server import a1111
from emaki.server.config import ServerConfig
from emaki.server.jobs import FINAL, STATES, JobStore
from emaki.server.payload import Uploads, request_to_payload
from emaki.server.worker import Worker

_OUTPUT = re.compile(r"^[0-9a-f]{32}-\d{1,5}\.png$")
_STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}


def create_app(config: ServerConfig, pipeline: Any) -> FastAPI:
    """The app serving ``pipeline`` (a loaded :class:`~emaki.pipelines.txt2img.Pipeline`)."""
    config.home.mkdir(parents=True, exist_ok=True)
    store = JobStore(config.db)
    uploads = Uploads(
        config.uploads,
        max_pixels=config.limits.max_image_pixels,
        max_bytes=config.limits.max_upload_bytes,
    )
    worker = Worker(store, pipeline, uploads, config.outputs)
    options: dict[str, Any] = {
        "sd_model_checkpoint": _model_title(pipeline),
        "sd_vae": "Automatic",
        "CLIP_stop_at_last_layers": 1,
    }

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for folder in (config.outputs, config.uploads):  # half-written files of a killed server
            for temp in folder.glob(".emaki-*.tmp") if folder.is_dir() else ():
                temp.unlink(missing_ok=True)
        store.recover()
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="emaki", version=__version__, lifespan=lifespan)
    app.state.store, app.state.worker, app.state.config = store, worker, config

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]):
        path = request.url.path
        if not (path == "/" or path.startswith("/static/")) and not _authorized(request, config):
            return JSONResponse(
                {"detail": "missing or wrong auth token"},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="emaki"'},
            )
        if request.method in _STATE_CHANGING and not _same_origin(request):
            return JSONResponse({"detail": "cross-origin request refused"}, status_code=403)
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return JSONResponse({"detail": "bad Content-Length"}, status_code=400)
            if int(length) > config.limits.max_upload_bytes:
                return JSONResponse(
                    {"detail": f"request body over {config.limits.max_upload_bytes} bytes"},
                    status_code=413,
                )
        elif request.method in _STATE_CHANGING and "chunked" in request.headers.get(
            "transfer-encoding", ""
        ):
            return JSONResponse({"detail": "send a Content-Length"}, status_code=411)
        return await call_next(request)

    @app.exception_handler(EmakiError)
    async def emaki_error(request: Request, exc: EmakiError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    # -- helpers ----------------------------------------------------------------------------

    def submit(request: GenerationRequest, kind: str) -> dict[str, Any]:
        pipeline.resolve(request)  # validates names (sampler, schedule, VAE) before queueing
        config.limits.check(request, pipeline.native_size)
        counts = store.counts()
        if counts.get("queued", 0) >= config.limits.max_queued:
            raise HTTPException(429, "the queue is full; try again later")
        return store.submit(kind, request_to_payload(request, uploads)).public()

    async def body_json(request: Request) -> Any:
        try:
            return await request.json()
        except ValueError:
            raise HTTPException(400, "the body is not valid JSON") from None

    async def wait_final(job_id: str) -> dict[str, Any]:
        while True:
            job = store.get(job_id)
            assert job is not None
            if job.state in FINAL:
                return job.public()
            await asyncio.sleep(0.05)

    def output_b64(name: str) -> str:
        return base64.b64encode((config.outputs / name).read_bytes()).decode()

    # -- native job API -----------------------------------------------------------------------

    @app.post("/api/jobs", status_code=202)
    async def create_job(request: Request) -> dict[str, Any]:
        """Queue a generation; returns the job (with its id) at once."""
        body = await body_json(request)
        req = _native_request(body, uploads)
        return submit(req, "img2img" if req.init is not None else "txt2img")

    @app.get("/api/jobs")
    async def list_jobs(state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        states = tuple(state.split(",")) if state else STATES
        return [j.public() for j in store.list(states, min(max(limit, 1), 1000))]

    @app.get("/api/jobs/{job_id}")
    async def get_job(job_id: str) -> dict[str, Any]:
        job = store.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        out = job.public()
        p = worker.snapshot()
        if p.job == job_id:
            out["progress"] = {"fraction": p.fraction(), "step": p.step, "steps": p.steps}
        return out

    @app.delete("/api/jobs/{job_id}")
    async def cancel_job(job_id: str) -> dict[str, Any]:
        state = worker.cancel(job_id)
        if state is None:
            if store.get(job_id) is None:
                raise HTTPException(404, f"no job {job_id}")
            raise HTTPException(409, "the job has already finished")
        return {"id": job_id, "state": "cancelled" if state == "cancelled" else "cancelling"}

    @app.get("/api/outputs/{name}")
    async def output(name: str) -> FileResponse:
        if not _OUTPUT.match(name) or not (config.outputs / name).is_file():
            raise HTTPException(404, "no such output")
        return FileResponse(config.outputs / name, media_type="image/png")

    @app.get("/api/preview.png")
    async def preview() -> Response:
        image = await asyncio.to_thread(worker.preview)
        if image is None:
            return Response(status_code=204)
        buf = io.BytesIO()
        image.resize((image.width * 4, image.height * 4)).save(buf, format="PNG")
        return Response(buf.getvalue(), media_type="image/png")

    @app.get("/api/info")
    async def info() -> dict[str, Any]:
        from emaki.sampling.registry import SAMPLERS
        from emaki.sampling.schedules import SCHEDULES

        return {
            "version": __version__,
            "model": options["sd_model_checkpoint"],
            "native_size": pipeline.native_size,
            "samplers": [s.label for s in SAMPLERS],
            "schedules": [s.label for s in SCHEDULES],
            "limits": config.limits.__dict__,
        }

    @app.websocket("/api/ws")
    async def events(ws: WebSocket) -> None:
        if config.token is not None and not secrets.compare_digest(
            ws.query_params.get("token", ""), config.token
        ):
            await ws.close(code=4401)
            return
        await ws.accept()
        seen = -1
        try:
            while True:
                p = worker.snapshot()
                if p.version != seen:
                    seen = p.version
                    preview = None
                    if p.latent is not None:  # a small PNG of the current x0 estimate
                        image = await asyncio.to_thread(worker.preview)
                        preview = _png_b64(image) if image is not None else None
                    await ws.send_json(
                        {
                            "job": p.job,
                            "step": p.step,
                            "steps": p.steps,
                            "iteration": p.iteration,
                            "iterations": p.iterations,
                            "fraction": p.fraction(),
                            "counts": store.counts(),
                            "preview": preview,
                        }
                    )
                await asyncio.sleep(0.1)
        except (WebSocketDisconnect, RuntimeError):
            return

    # -- A1111-compatible API -----------------------------------------------------------------

    async def a1111_generate(request: Request, img2img: bool) -> dict[str, Any]:
        body = await body_json(request)
        title = options["sd_model_checkpoint"]
        if img2img:
            req = a1111.img2img_request(body, uploads, current_model=title)
        else:
            req = a1111.txt2img_request(body, current_model=title, uploads=uploads)
        names = a1111.styles_of(body)
        req = _apply_styles(req, names, _load_styles(pipeline) if names else {})
        job = submit(req, "img2img" if img2img else "txt2img")
        done = await wait_final(job["id"])
        if done["state"] != "done":
            raise HTTPException(409 if done["state"] == "cancelled" else 500, done["error"])
        result = done["result"]
        bundle = pipeline.bundle
        info = a1111.info_json(
            pipeline.resolve(req).request if req.seed == -1 else req,
            result["seeds"],
            result["infotexts"],
            bundle.name,
            bundle.hash,
            result["width"],
            result["height"],
        )
        images = [output_b64(n) for n in result["images"]] if body.get("send_images", True) else []
        params = {k: v for k, v in body.items() if k not in ("init_images", "mask")}
        return {"images": images, "parameters": params, "info": info}

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request) -> dict[str, Any]:
        return await a1111_generate(request, img2img=False)

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request) -> dict[str, Any]:
        return await a1111_generate(request, img2img=True)

    @app.post("/sdapi/v1/png-info")
    async def png_info(request: Request) -> dict[str, Any]:
        from emaki.imageio import stored_infotext
        from emaki.infotext import parse_infotext

        body = await body_json(request)
        image = uploads.decode_base64((body or {}).get("image", ""), "image")
        text = stored_infotext(image) or ""
        parsed = parse_infotext(text) if text else None
        params: dict[str, Any] = {}
        if parsed is not None:
            params = {
                "Prompt": parsed.prompt,
                "Negative prompt": parsed.negative_prompt,
                **parsed.params,
            }
        return {"info": text, "items": {"parameters": text} if text else {}, "parameters": params}

    @app.post("/sdapi/v1/interrupt")
    async def interrupt() -> dict[str, Any]:
        worker.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    async def skip() -> dict[str, Any]:
        worker.skip()
        return {}

    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False) -> dict[str, Any]:
        p = worker.snapshot()
        current = None
        if not skip_current_image and p.latent is not None:
            image = await asyncio.to_thread(worker.preview)
            if image is not None:
                current = _png_b64(image)
        fraction = p.fraction()
        elapsed = max(0.0, time.time() - p.started) if p.job else 0.0
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        return {
            "progress": fraction,
            "eta_relative": eta,
            "state": {
                "skipped": False,
                "interrupted": False,
                "job": p.job or "",
                "job_count": store.counts().get("queued", 0) + (1 if p.job else 0),
                "job_timestamp": "0",
                "job_no": p.iteration,
                "sampling_step": p.step,
                "sampling_steps": p.steps,
            },
            "current_image": current,
            "textinfo": None,
        }

    @app.get("/sdapi/v1/options")
    async def get_options() -> dict[str, Any]:
        return options

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request) -> dict[str, Any]:
        body = await body_json(request)
        if not isinstance(body, dict):
            raise HTTPException(400, "options must be a JSON object")
        model = body.get("sd_model_checkpoint")
        if model and model not in (options["sd_model_checkpoint"], pipeline.bundle.name):
            raise HTTPException(400, "switching checkpoints is not supported by this server")
        for key in ("sd_vae", "CLIP_stop_at_last_layers"):
            if key in body:
                options[key] = body[key]
        return {}

    @app.get("/sdapi/v1/samplers")
    async def samplers() -> list[dict[str, Any]]:
        from emaki.sampling.registry import SAMPLERS

        return [{"name": s.label, "aliases": [s.name], "options": {}} for s in SAMPLERS]

    @app.get("/sdapi/v1/schedulers")
    async def schedulers() -> list[dict[str, Any]]:
        from emaki.sampling.schedules import SCHEDULES

        return [
            {
                "name": s.name,
                "label": s.label,
                "aliases": None,
                "default_rho": -1,
                "need_inner_model": False,
            }
            for s in SCHEDULES
        ]

    @app.get("/sdapi/v1/sd-models")
    async def sd_models() -> list[dict[str, Any]]:
        b = pipeline.bundle
        return [
            {
                "title": options["sd_model_checkpoint"],
                "model_name": b.name,
                "hash": b.hash,
                "sha256": None,
                "filename": b.name,
                "config": None,
            }
        ]

    def library(kind: str) -> list[Any]:
        from emaki.models.library import list_models

        return list_models(kind, pipeline.models)

    @app.get("/sdapi/v1/sd-vae")
    async def sd_vae() -> list[dict[str, Any]]:
        return [{"model_name": e.name, "filename": e.path.name} for e in library("vae")]

    @app.get("/sdapi/v1/loras")
    async def loras() -> list[dict[str, Any]]:
        return [
            {"name": e.name, "alias": e.name, "path": e.path.name, "metadata": {}}
            for e in library("lora")
        ]

    @app.get("/controlnet/model_list")  # the ControlNet extension's routes that clients query
    async def controlnet_models() -> dict[str, Any]:
        return {"model_list": [e.name for e in library("controlnet")]}

    @app.get("/controlnet/module_list")
    async def controlnet_modules() -> dict[str, Any]:
        from emaki.control.webui import module_list

        return {"module_list": module_list()}

    @app.get("/sdapi/v1/embeddings")
    async def embeddings() -> dict[str, Any]:
        lib = pipeline.embedding_library()
        loaded = {}
        if lib is not None:
            for name in lib.names():
                e = lib.get(name)
                loaded[name] = {
                    "step": None,
                    "sd_checkpoint": None,
                    "sd_checkpoint_name": None,
                    "shape": int(e.vectors.shape[-1]),
                    "vectors": int(e.vectors.shape[0]),
                }
        return {"loaded": loaded, "skipped": {}}

    @app.get("/sdapi/v1/prompt-styles")
    async def prompt_styles() -> list[dict[str, Any]]:
        styles = _load_styles(pipeline)
        return [
            {"name": n, "prompt": s.prompt, "negative_prompt": s.negative_prompt}
            for n, s in styles.items()
        ]

    @app.get("/sdapi/v1/memory")
    async def memory() -> dict[str, Any]:
        import os

        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        return {
            "ram": {"free": free, "used": total - free, "total": total},
            "cuda": {"error": "no CUDA device"},
        }

    # -- the page -----------------------------------------------------------------------------

    static = Path(str(resources.files("emaki.server") / "static"))
    if static.is_dir():
        app.mount("/static", StaticFiles(directory=static), name="static")

        @app.get("/", response_class=HTMLResponse)
        async def page() -> HTMLResponse:
            return HTMLResponse((static / "index.html").read_text(encoding="utf-8"))

    return app


def _png_b64(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _model_title(pipeline: Any) -> str:
    b = pipeline.bundle
    return f"{b.name} [{b.hash}]" if b.hash else b.name


def _authorized(request: Request, config: ServerConfig) -> bool:
    if config.token is None:
        return True
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return secrets.compare_digest(value.strip(), config.token)
    if scheme.lower() == "basic":
        try:
            _, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return secrets.compare_digest(password, config.token)
    return False


def _same_origin(request: Request) -> bool:
    """No Origin header (not a browser, or same-origin GET) or an Origin equal to our host."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    return urlsplit(origin).netloc == host


def _native_request(body: Any, uploads: Uploads) -> GenerationRequest:
    """The native job body: GenerationRequest fields, images base64 inside ``init`` and each
    ``control`` unit."""
    from emaki.server.payload import request_from_payload

    if not isinstance(body, dict):
        raise InvalidRequestError("the body must be a JSON object of request fields")
    body = dict(body)
    init = body.get("init")
    if init is not None:
        if not isinstance(init, dict) or "image" not in init:
            raise InvalidRequestError("init must be an object with a base64 'image'")
        init = dict(init)
        init["image"] = uploads.put(uploads.decode_base64(init["image"], "init.image"))
        if init.get("mask") is not None:
            init["mask"] = uploads.put(uploads.decode_base64(init["mask"], "init.mask"))
        body["init"] = init
    control = body.get("control")
    if control:
        if not isinstance(control, list) or not all(
            isinstance(c, dict) and "image" in c for c in control
        ):
            raise InvalidRequestError("control must be a list of objects with a base64 'image'")
        body["control"] = [
            {**c, "image": uploads.put(uploads.decode_base64(c["image"], f"control[{i}].image"))}
            for i, c in enumerate(control)
        ]
    try:
        return request_from_payload(body, uploads)
    except TypeError as e:
        raise InvalidRequestError(f"bad request fields: {e}") from None


def _load_styles(pipeline: Any) -> dict[str, Any]:
    from emaki.models.library import models_root
    from emaki.prompts.styles import load_styles

    path = (pipeline.models or models_root()).parent / "styles.csv"
    return load_styles(path) if path.is_file() else {}


def _apply_styles(
    request: GenerationRequest, names: list[str], styles: dict[str, Any]
) -> GenerationRequest:
    """A1111's ``styles`` field: named styles merged into the prompts; unknown names refused."""
    if not names:
        return request
    from dataclasses import replace

    from emaki.prompts.styles import apply_styles

    missing = [n for n in names if n not in styles]
    if missing:
        raise InvalidRequestError(f"unknown style {missing[0]!r}")
    prompt, negative = apply_styles(
        request.prompt, request.negative_prompt, [styles[n] for n in names]
    )
    return replace(request, prompt=prompt, negative_prompt=negative)
