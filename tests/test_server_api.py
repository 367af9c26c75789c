"""emaki serve's HTTP API on a tiny model: A1111 routes, the job API, limits, auth, origins."""

from __future__ import annotations

import base64
import io
import json
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from emaki.models.tiny import make_tiny_bundle
from emaki.pipelines.txt2img import Pipeline
from emaki.server.app import create_app
from emaki.server.config import Limits, ServerConfig

FIXTURES = Path(__file__).parent / "fixtures" / "a1111"


@pytest.fixture(scope="module")
def pipeline():
    return Pipeline(make_tiny_bundle("sd1", seed=0))


def _client(tmp_path, pipeline, **kw) -> TestClient:
    limits = kw.pop("limits", Limits(max_upload_bytes=2_000_000))
    config = ServerConfig(home=tmp_path / "server", limits=limits, **kw)
    return TestClient(create_app(config, pipeline))


@pytest.fixture
def client(tmp_path, pipeline):
    with _client(tmp_path, pipeline) as c:
        yield c


def _b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _wait(client: TestClient, job_id: str, states=("done", "failed", "cancelled")) -> dict:
    deadline = time.time() + 60
    while time.time() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not reach {states}")


# -- A1111 routes ------------------------------------------------------------------------------


def test_txt2img_returns_images_parameters_and_info(client) -> None:
    body = {"prompt": "a red apple", "negative_prompt": "blurry", "steps": 3, "seed": 11,
            "batch_size": 2, "sampler_name": "Euler a", "cfg_scale": 6}  # fmt: skip
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["parameters"] == body
    info = json.loads(out["info"])
    assert info["all_seeds"] == [11, 12] and info["sampler_name"] == "Euler a"
    images = [_image(b) for b in out["images"]]
    assert len(images) == 2 and images[0].size == (64, 64)
    assert "Seed: 11" in images[0].info["parameters"]
    again = client.post("/sdapi/v1/txt2img", json=body).json()
    assert again["images"][0] == out["images"][0]  # the same request, the same image


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("*.json")))
def test_a1111_client_payloads_work_unchanged(client, name) -> None:
    fixture = json.loads((FIXTURES / name).read_text())
    body = fixture["body"]
    for key in ("init_images", "mask"):  # fixtures keep images small: fill in real ones
        if key in body:
            size = (64, 64)
            im = (
                Image.new("RGB", size, (200, 40, 40))
                if key == "init_images"
                else Image.new("L", size, 0)
            )
            if key == "mask":
                im.paste(255, (16, 16, 48, 48))
            body[key] = [_b64(im)] if key == "init_images" else _b64(im)
    r = client.post(fixture["route"], json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["images"]) == fixture["expect_images"]
    assert "parameters" in _image(out["images"][0]).info


def test_img2img_inpaint_keeps_unmasked_pixels(client) -> None:
    init = Image.new("RGB", (64, 64), (30, 120, 200))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    body = {"prompt": "x", "init_images": [_b64(init)], "mask": _b64(mask), "steps": 3,
            "seed": 1, "denoising_strength": 0.9, "mask_blur": 0, "inpaint_full_res": False}  # fmt: skip
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    out = np.asarray(_image(r.json()["images"][0]).convert("RGB"), dtype=np.int16)
    assert (out[:8] == (30, 120, 200)).all()
    assert np.abs(out[24:40, 24:40] - (30, 120, 200)).mean() > 5


def test_png_info_reads_back_the_parameters(client) -> None:
    out = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 2, "seed": 5}).json()
    r = client.post("/sdapi/v1/png-info", json={"image": out["images"][0]})
    assert r.status_code == 200
    info = r.json()
    assert info["info"].startswith("a cat\n") and info["parameters"]["Seed"] == "5"


@pytest.mark.parametrize(
    "route",
    ["samplers", "schedulers", "sd-models", "sd-vae", "loras", "embeddings", "options",
     "prompt-styles", "memory", "progress"],
)  # fmt: skip
def test_a1111_get_routes(client, route) -> None:
    r = client.get(f"/sdapi/v1/{route}")
    assert r.status_code == 200, r.text
    data = r.json()
    if route == "samplers":
        assert {"name": "Euler a", "aliases": ["euler_ancestral"], "options": {}} in data
    if route == "sd-models":
        assert data[0]["model_name"] == "tiny-sd1-seed0"
    if route == "progress":
        assert data["progress"] == 0 and data["state"]["job"] == ""


def test_options_accept_the_loaded_model_and_refuse_others(client) -> None:
    title = client.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": title}).status_code == 200
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "other.safetensors"})
    assert r.status_code == 400 and "not supported" in r.json()["detail"]


# -- the native job API -----------------------------------------------------------------------


def test_job_submit_poll_and_fetch_output(client) -> None:
    r = client.post("/api/jobs", json={"prompt": "a cat", "steps": 2, "seed": 4})
    assert r.status_code == 202
    job = r.json()
    assert job["state"] in ("queued", "running") and len(job["id"]) == 32
    done = _wait(client, job["id"])
    assert done["state"] == "done" and done["result"]["seeds"] == [4]
    png = client.get(f"/api/outputs/{done['result']['images'][0]}")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert client.get("/api/jobs", params={"state": "done"}).json()[-1]["id"] == job["id"]


def test_cancel_running_job_stops_it_and_the_next_runs(client) -> None:
    slow = client.post("/api/jobs", json={"prompt": "x", "steps": 150, "seed": 1}).json()
    after = client.post("/api/jobs", json={"prompt": "y", "steps": 2, "seed": 2}).json()
    queued = client.post("/api/jobs", json={"prompt": "z", "steps": 2, "seed": 3}).json()
    assert client.delete(f"/api/jobs/{queued['id']}").json()["state"] == "cancelled"
    _wait(client, slow["id"], states=("running",))
    t0 = time.time()
    assert client.delete(f"/api/jobs/{slow['id']}").json()["state"] == "cancelling"
    assert _wait(client, slow["id"])["state"] == "cancelled"
    assert time.time() - t0 < 2.0
    assert _wait(client, after["id"])["state"] == "done"
    assert client.get(f"/api/jobs/{queued['id']}").json()["state"] == "cancelled"
    assert client.delete(f"/api/jobs/{after['id']}").status_code == 409
    assert client.delete("/api/jobs/" + "0" * 32).status_code == 404


def test_native_img2img_job(client) -> None:
    init = {"image": _b64(Image.new("RGB", (64, 64), (0, 200, 0))), "resize_mode": 0}
    job = client.post("/api/jobs", json={"prompt": "x", "steps": 2, "init": init}).json()
    assert job["kind"] == "img2img"
    assert _wait(client, job["id"])["state"] == "done"


# -- rejections: always 4xx with a message -------------------------------------------------------


def _bomb_png(width: int = 100_000, height: int = 100_000) -> str:
    """A tiny PNG whose header claims a huge image (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    raw = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 100))
        + chunk(b"IEND", b"")
    )
    return base64.b64encode(raw).decode()


@pytest.mark.parametrize(
    ("route", "body", "status", "needle"),
    [
        ("/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "Nope"}, 400, "sampler"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "steps": 500}, 400, "steps"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "width": 4096, "height": 4096}, 400, "pixels"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "steps": "many"}, 400, "steps must be int"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "restore_faces": True}, 400, "restore_faces"),
        ("/sdapi/v1/txt2img", {"prompt": "x" * 30_000}, 400, "longer than"),
        ("/sdapi/v1/img2img", {"prompt": "x"}, 400, "init_images"),
        ("/sdapi/v1/img2img", {"prompt": "x", "init_images": ["%%%"]}, 400, "base64"),
        (
            "/sdapi/v1/img2img",
            {"prompt": "x", "init_images": ["aGVsbG8="]},
            400,
            "not a readable image",
        ),
        ("/sdapi/v1/img2img", {"prompt": "x", "init_images": [_bomb_png()]}, 400, "pixels allowed"),
        ("/sdapi/v1/png-info", {"image": "aGVsbG8="}, 400, "not a readable image"),
        ("/api/jobs", {"prompt": "x", "bogus": 1}, 400, "unknown request fields"),
        ("/api/jobs", {"prompt": "x", "init": {"image": "x", "path": "/etc/passwd"}}, 400, "init"),
        ("/api/jobs", ["not", "an", "object"], 400, "JSON object"),
        ("/api/jobs", {"prompt": "x", "vae": "../../etc/passwd"}, 400, "passwd"),
        ("/api/jobs", {"prompt": "x <lora:../../secret:1>"}, 400, "secret"),
    ],
)
def test_bad_requests_are_4xx_with_a_message(client, route, body, status, needle) -> None:
    r = client.post(route, json=body)
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"]


def test_invalid_json_and_oversized_bodies(tmp_path, pipeline) -> None:
    with _client(tmp_path, pipeline, limits=Limits(max_upload_bytes=1000)) as c:
        r = c.post(
            "/sdapi/v1/txt2img", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert r.status_code == 400 and "JSON" in r.json()["detail"]
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x" * 5000})
        assert r.status_code == 413


@pytest.mark.parametrize("name", ["../../etc/passwd", "..%2F..%2Fjobs.db", "jobs.db", "x.png"])
def test_output_paths_are_confined(client, name) -> None:
    r = client.get(f"/api/outputs/{name}")
    assert r.status_code == 404


def test_cross_origin_posts_are_refused(client) -> None:
    r = client.post("/api/jobs", json={"prompt": "x"}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403
    ok = client.post(
        "/api/jobs", json={"prompt": "x", "steps": 1}, headers={"Origin": "http://testserver"}
    )
    assert ok.status_code == 202
    assert client.get("/api/info", headers={"Origin": "http://evil.example"}).status_code == 200


def test_token_guards_every_route_but_the_page(tmp_path, pipeline) -> None:
    with _client(tmp_path, pipeline, token="s3cret-token") as c:
        assert c.get("/sdapi/v1/samplers").status_code == 401
        assert (
            c.get("/sdapi/v1/samplers", headers={"Authorization": "Bearer nope"}).status_code == 401
        )
        ok = c.get("/sdapi/v1/samplers", headers={"Authorization": "Bearer s3cret-token"})
        assert ok.status_code == 200
        basic = base64.b64encode(b"user:s3cret-token").decode()
        assert c.get("/api/info", headers={"Authorization": f"Basic {basic}"}).status_code == 200
        assert c.get("/").status_code == 200
        assert c.post("/sdapi/v1/interrupt").status_code == 401


def test_serve_refuses_to_expose_without_a_token(tmp_path, capsys) -> None:
    from emaki.cli import main

    assert main(["serve", "--host", "0.0.0.0", "--home", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "without an auth token" in err and "Traceback" not in err


def test_progress_preview_websocket_interrupt_and_skip(client) -> None:
    slow = client.post(
        "/api/jobs", json={"prompt": "x", "steps": 150, "seed": 1, "n_iter": 3}
    ).json()
    _wait(client, slow["id"], states=("running",))
    deadline = time.time() + 30
    while client.get("/sdapi/v1/progress").json()["state"]["sampling_step"] < 2:
        assert time.time() < deadline
        time.sleep(0.02)
    p = client.get("/sdapi/v1/progress").json()
    assert p["state"]["job"] == slow["id"] and 0 < p["progress"] < 1
    assert p["current_image"] is not None and _image(p["current_image"]).size[0] > 0
    assert client.get("/api/preview.png").headers["content-type"] == "image/png"
    with client.websocket_connect("/api/ws") as ws:
        event = ws.receive_json()
        assert event["job"] == slow["id"] and event["steps"] == 150
        assert _image(event["preview"]).size == (8, 8)  # the latent's size: a cheap preview
    # skip: the first of three batches stops, the job goes on with the next
    assert client.post("/sdapi/v1/skip").status_code == 200
    deadline = time.time() + 30
    while client.get("/sdapi/v1/progress").json()["state"]["job_no"] < 1:
        assert time.time() < deadline
        time.sleep(0.02)
    assert client.post("/sdapi/v1/interrupt").status_code == 200
    done = _wait(client, slow["id"])
    assert done["state"] == "cancelled"


def test_websocket_needs_the_token(tmp_path, pipeline) -> None:
    from starlette.websockets import WebSocketDisconnect

    with _client(tmp_path, pipeline, token="s3cret-token") as c:
        with pytest.raises(WebSocketDisconnect), c.websocket_connect("/api/ws") as ws:
            ws.receive_json()
        with c.websocket_connect("/api/ws?token=s3cret-token") as ws:
            assert ws.receive_json()["job"] is None


def test_openapi_schema_is_published(client) -> None:
    schema = client.get("/openapi.json").json()
    assert "/api/jobs" in schema["paths"] and "/sdapi/v1/txt2img" in schema["paths"]
