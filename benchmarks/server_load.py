"""Load test of emaki serve: concurrent clients submitting jobs and polling their status.

Starts ``emaki serve`` on loopback with a tiny random model (so generation is cheap and the
server's own overhead dominates), then runs N client threads for a bounded time; each submits a
job, polls ``GET /api/jobs/{id}`` until it is final, and repeats. Afterwards it checks that the
server knows exactly the jobs the clients submitted, each done once with its own image, and
prints the status route's latency percentiles and any error responses.

    .venv/bin/python benchmarks/server_load.py --clients 20 --seconds 60
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """One keep-alive HTTP connection."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict | list]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data else {}
        self.conn.request(method, path, body=data, headers=headers)
        r = self.conn.getresponse()
        return r.status, json.loads(r.read() or b"null")


def run_client(port: int, stop: float, out: dict, lock: threading.Lock, n: int) -> None:
    c = Client(port)
    submitted, latencies, errors = [], [], []
    i = 0
    while time.time() < stop:
        status, job = c.call(
            "POST",
            "/api/jobs",
            {"prompt": f"client {n} job {i}", "steps": 2, "seed": n * 100_000 + i},
        )
        if status != 202:
            errors.append((status, job))
            continue
        submitted.append(job["id"])
        while True:
            t0 = time.perf_counter()
            status, state = c.call("GET", f"/api/jobs/{job['id']}")
            latencies.append(time.perf_counter() - t0)
            if status != 200:
                errors.append((status, state))
                break
            if state["state"] in ("done", "failed", "cancelled", "interrupted"):
                if state["state"] != "done":
                    errors.append(("job", state["state"], state["error"]))
                break
            time.sleep(0.05)
        i += 1
    with lock:
        out["submitted"] += submitted
        out["latencies"] += latencies
        out["errors"] += errors


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=60)
    args = ap.parse_args()

    from emaki.models.saving import save_diffusers
    from emaki.models.tiny import make_tiny_bundle

    tmp = Path(tempfile.mkdtemp(prefix="emaki-load-"))
    save_diffusers(make_tiny_bundle("sd1", seed=0), tmp / "model")
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "emaki.cli",
            "serve",
            "--model",
            str(tmp / "model"),
            "--home",
            str(tmp / "home"),
            "--port",
            str(port),
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                Client(port).call("GET", "/api/info")
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        out: dict = {"submitted": [], "latencies": [], "errors": []}
        lock = threading.Lock()
        stop = time.time() + args.seconds
        threads = [
            threading.Thread(target=run_client, args=(port, stop, out, lock, n))
            for n in range(args.clients)
        ]
        t0 = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.time() - t0
        _, jobs = Client(port).call("GET", "/api/jobs?limit=1000000")
    finally:
        server.terminate()
        server.wait(30)

    submitted = out["submitted"]
    by_id = {j["id"]: j for j in jobs}
    lost = [i for i in submitted if i not in by_id]
    extra = [i for i in by_id if i not in set(submitted)]
    dup = len(submitted) - len(set(submitted))
    not_done = [i for i in submitted if by_id.get(i, {}).get("state") != "done"]
    outputs = sorted(p.name for p in (tmp / "home" / "outputs").iterdir())
    expected = sorted(f"{i}-0.png" for i in submitted)
    lat = sorted(out["latencies"])
    q = statistics.quantiles(lat, n=100)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )
    print(f"command: {' '.join(sys.argv)}")
    print(
        f"clients {args.clients}, {wall:.0f} s: {len(submitted)} jobs submitted and finished "
        f"({len(submitted) / wall:.1f} jobs/s), {len(lat)} status requests"
    )
    print(
        f"status route latency: p50 {q[49] * 1000:.1f} ms, p99 {q[98] * 1000:.1f} ms, "
        f"max {lat[-1] * 1000:.1f} ms"
    )
    print(
        f"lost {len(lost)}, unknown {len(extra)}, duplicated {dup}, not done {len(not_done)}, "
        f"error responses {len(out['errors'])}, outputs match jobs: {outputs == expected}"
    )
    ok = not (lost or extra or dup or not_done or out["errors"]) and outputs == expected
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
