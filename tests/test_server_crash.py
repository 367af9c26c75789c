"""Crash consistency: kill -9 the server mid-job; after a restart every job finishes exactly once."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from emaki.models.saving import save_diffusers
from emaki.models.tiny import make_tiny_bundle


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(port: int, method: str, path: str, body: dict | None = None) -> dict | list:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, method=method,
        headers={"Content-Type": "application/json"} if data else {},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _start(model: Path, home: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "emaki.cli", "serve", "--model", str(model), "--home", str(home),
         "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            _call(port, "GET", "/api/info")
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not start")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny"
    save_diffusers(make_tiny_bundle("sd1", seed=0), path)
    return path


def test_kill_9_mid_job_then_restart_finishes_all_20_exactly_once(model, tmp_path) -> None:
    home, port = tmp_path / "home", _free_port()
    server = _start(model, home, port)
    try:
        ids = [
            _call(port, "POST", "/api/jobs", {"prompt": f"job {i}", "steps": 12, "seed": i})["id"]
            for i in range(20)
        ]
        # wait until some jobs are done and one is running, then kill without warning
        deadline = time.time() + 120
        while time.time() < deadline:
            jobs = {j["id"]: j for j in _call(port, "GET", "/api/jobs")}
            done = sum(j["state"] == "done" for j in jobs.values())
            running = [j for j in jobs.values() if j["state"] == "running"]
            if done >= 3 and running:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("jobs did not start")
        killed_running = running[0]["id"]
        os.kill(server.pid, signal.SIGKILL)
        server.wait(30)
    finally:
        if server.poll() is None:
            server.kill()

    server = _start(model, home, port)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            jobs = {j["id"]: j for j in _call(port, "GET", "/api/jobs")}
            if all(jobs[i]["state"] in ("done", "failed", "cancelled", "interrupted") for i in ids):
                break
            time.sleep(0.1)
        else:
            raise AssertionError("jobs did not finish after the restart")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)

    assert sorted(jobs) == sorted(ids)  # none lost, none added
    assert all(jobs[i]["state"] == "done" for i in ids), {i: jobs[i]["state"] for i in ids}
    assert jobs[killed_running]["attempts"] == 2  # the interrupted job ran again, once
    outputs = sorted(p.name for p in (home / "outputs").iterdir())
    assert outputs == sorted(f"{i}-0.png" for i in ids)  # one image per job, no copies
    seeds = sorted(jobs[i]["result"]["seeds"][0] for i in ids)
    assert seeds == list(range(20))
