"""The worker: one thread that takes jobs from the queue and runs them on the loaded model.

It keeps a small in-memory view of what is running (job, step, a preview) for progress routes
and the websocket; everything durable is in the :class:`~emaki.server.jobs.JobStore`. Cancel
and skip requests are flags checked after every sampler step, so a cancelled job stops within
one step and other jobs are untouched.
"""

from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image

from emaki.errors import EmakiError
from emaki.imageio import png_bytes, write_atomic
from emaki.request import GenerationRequest
from emaki.sampling.types import StepInfo
from emaki.server.jobs import Job, JobStore
from emaki.server.payload import Uploads, request_from_payload


class JobCancelled(Exception):
    """Raised from the progress callback to stop the running job."""


class _Skip(Exception):
    """Raised from the progress callback to skip the current batch of the job (A1111 skip)."""


@dataclass
class Progress:
    """What the running job is doing (read by the progress routes; written by the worker)."""

    job: str | None = None
    iteration: int = 0
    iterations: int = 0
    step: int = 0
    steps: int = 0
    started: float = 0.0
    latent: Any = None  #: the newest x0 estimate [B, C, h, w], for previews
    version: int = 0  #: bumped on every change (the websocket sends changes)

    def fraction(self) -> float:
        if not self.job or not self.steps or not self.iterations:
            return 0.0
        return min(1.0, (self.iteration + self.step / self.steps) / self.iterations)


class Worker:
    """Runs queued jobs one at a time on ``pipeline`` in a daemon thread."""

    def __init__(self, store: JobStore, pipeline: Any, uploads: Uploads, outputs: Path) -> None:
        self.store = store
        self.pipeline = pipeline
        self.uploads = uploads
        self.outputs = Path(outputs)
        self.progress = Progress()
        self._lock = threading.Lock()
        self._cancel: set[str] = set()
        self._skip = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rgb: Any = None

    # -- control ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="emaki-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        with self._lock:
            if self.progress.job:
                self._cancel.add(self.progress.job)
        if self._thread is not None:
            self._thread.join(timeout)

    def cancel(self, job_id: str) -> str | None:
        """Cancel a job by id: queued ones at once, the running one at its next step."""
        state = self.store.cancel(job_id)
        if state == "running":
            with self._lock:
                self._cancel.add(job_id)
        return state

    def interrupt(self) -> str | None:
        """A1111's /interrupt: cancel whatever is running (returns its id)."""
        with self._lock:
            job = self.progress.job
        if job is not None:
            self.cancel(job)
        return job

    def skip(self) -> None:
        """A1111's /skip: stop the running batch and go on with the job's next one."""
        with self._lock:
            self._skip = self.progress.job is not None

    def snapshot(self) -> Progress:
        with self._lock:
            return replace(self.progress)

    def preview(self) -> Image.Image | None:
        """A cheap preview of the running job: the x0 estimate through a linear latent->RGB map."""
        latent = self.snapshot().latent
        if latent is None:
            return None
        from emaki.latents import fit_rgb_factors, preview_image

        if self._rgb is None:
            self._rgb = fit_rgb_factors(self.pipeline.bundle.vae, self.pipeline.latent_format)
        return preview_image(latent[0], self._rgb)

    # -- the loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            job = self.store.claim()
            if job is None:
                self.store.wait_for_work(0.5)
                continue
            self._run(job)

    def _run(self, job: Job) -> None:
        try:
            request = request_from_payload(job.payload, self.uploads)
            result = self._generate(job, request)
        except JobCancelled:
            self.store.fail(job.id, "cancelled", state="cancelled")
        except EmakiError as e:
            self.store.fail(job.id, str(e))
        except Exception as e:  # a bug: keep the server up, record what happened
            traceback.print_exc()
            self.store.fail(job.id, f"internal error: {type(e).__name__}: {e}")
        else:
            self.store.finish(job.id, result)
        finally:
            with self._lock:
                self._cancel.discard(job.id)
                self.progress = Progress(version=self.progress.version + 1)

    def _generate(self, job: Job, request: GenerationRequest) -> dict[str, Any]:
        pipe = self.pipeline
        request = pipe.resolve(request).request  # fixes the seed once for every batch
        passes = 2 if request.hires is not None else 1
        with self._lock:
            self.progress = Progress(
                job=job.id, iterations=request.n_iter, steps=request.steps * passes,
                started=time.time(), version=self.progress.version + 1,
            )  # fmt: skip
        images: list[str] = []
        infotexts: list[str] = []
        seeds: list[int] = []
        size = (0, 0)
        for n in range(request.n_iter):
            one = replace(request, n_iter=1, seed=request.seed + n * request.batch_size)
            with self._lock:
                self.progress.iteration, self.progress.step = n, 0
                self._skip = False
            try:
                result = pipe.generate(one, progress=self._callback(job.id, request.steps))
            except _Skip:
                continue
            for i, (image, text, seed) in enumerate(
                zip(result.images, result.infotexts, result.seeds)
            ):
                name = f"{job.id}-{n * request.batch_size + i}.png"
                write_atomic(self.outputs / name, png_bytes(image, text))
                images.append(name)
                infotexts.append(text)
                seeds.append(seed)
                size = image.size
        return {
            "images": images,
            "infotexts": infotexts,
            "seeds": seeds,
            "width": size[0],
            "height": size[1],
            "request": {k: v for k, v in job.payload.items() if k != "init"},
        }

    def _callback(self, job_id: str, steps: int) -> Any:
        def on_step(info: StepInfo, index: int, total: int) -> None:
            with self._lock:
                if job_id in self._cancel:
                    raise JobCancelled()
                if self._skip:
                    self._skip = False
                    raise _Skip()
                p = self.progress
                p.step = index * steps + info.i + 1
                p.latent = info.denoised.detach()
                p.version += 1

        return on_step
