"""The persistent job queue: SQLite in WAL mode, one row per job.

A job moves ``queued -> running -> done | failed | cancelled``. Every transition is one SQL
statement guarded by the expected current state, so two workers (or a worker and a cancel
request) can never both win, and a job is claimed at most once per attempt.

Crash safety (``kill -9`` at any moment): committed rows survive (WAL + ``synchronous=FULL``).
On start, :meth:`JobStore.recover` finds jobs a dead process left ``running`` and puts them back
in the queue (``attempts`` counts the tries; after ``max_attempts`` they are marked
``interrupted``, never ``done``). A job's outputs have names fixed by its id, written
atomically, so a job re-run after a crash replaces its own files instead of adding copies: it
finishes exactly once.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATES = ("queued", "running", "done", "failed", "cancelled", "interrupted")
FINAL = ("done", "failed", "cancelled", "interrupted")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    result TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state_seq ON jobs (state, seq);
"""


@dataclass(frozen=True)
class Job:
    """One row of the queue, decoded."""

    id: str
    kind: str
    payload: dict[str, Any]
    state: str
    attempts: int
    created: float
    started: float | None = None
    finished: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    position: int | None = field(default=None, compare=False)  #: jobs ahead (queued only)

    def public(self) -> dict[str, Any]:
        """What the API shows of a job (the payload stays private: it may hold file paths)."""
        return {
            "id": self.id,
            "kind": self.kind,
            "state": self.state,
            "attempts": self.attempts,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "result": self.result,
            "error": self.error,
            "position": self.position,
        }


class JobStore:
    """A queue of jobs in an SQLite file; safe to share between threads of one process."""

    def __init__(self, path: Path, *, max_attempts: int = 2) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_attempts = max_attempts
        self._local = threading.local()
        self._wake = threading.Condition()
        self._db().executescript(_SCHEMA)  # executescript manages its own transaction

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.row_factory = sqlite3.Row
            self._local.db = db
        return db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE`` takes the write lock up front)."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # -- writing ----------------------------------------------------------------------------

    def submit(self, kind: str, payload: dict[str, Any]) -> Job:
        """Queue a job; returns it with its new id at once."""
        job_id = uuid.uuid4().hex
        now = time.time()
        with self._tx() as db:
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            db.execute(
                "INSERT INTO jobs (id, seq, kind, payload, state, created) "
                "VALUES (?, ?, ?, ?, 'queued', ?)",
                (job_id, seq, kind, json.dumps(payload), now),
            )
        with self._wake:
            self._wake.notify_all()
        job = self.get(job_id)
        assert job is not None
        return job

    def claim(self) -> Job | None:
        """Take the oldest queued job and mark it running (None if the queue is empty)."""
        with self._tx() as db:
            row = db.execute(
                "SELECT id FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state = 'running', started = ?, attempts = attempts + 1 "
                "WHERE id = ? AND state = 'queued'",
                (time.time(), row["id"]),
            )
        return self.get(row["id"])

    def wait_for_work(self, timeout: float) -> None:
        """Sleep until a job is submitted (or ``timeout`` seconds pass)."""
        with self._wake:
            self._wake.wait(timeout)

    def finish(self, job_id: str, result: dict[str, Any]) -> bool:
        """running -> done with its result; False if the job was no longer running."""
        return self._move(job_id, "running", "done", result=result)

    def fail(self, job_id: str, error: str, state: str = "failed") -> bool:
        """running -> failed (or cancelled/interrupted) with a message."""
        return self._move(job_id, "running", state, error=error)

    def cancel(self, job_id: str) -> str | None:
        """Cancel a queued job at once (returns "cancelled"), or report a running one
        ("running": the worker stops it at its next step). None: unknown or already final."""
        with self._tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["state"] in FINAL:
                return None
            if row["state"] == "queued":
                db.execute(
                    "UPDATE jobs SET state = 'cancelled', finished = ?, error = ? "
                    "WHERE id = ? AND state = 'queued'",
                    (time.time(), "cancelled before it started", job_id),
                )
                return "cancelled"
            return "running"

    def recover(self) -> list[str]:
        """After a restart: re-queue jobs left running by a dead process (or mark them
        interrupted after ``max_attempts`` tries). Returns the ids re-queued."""
        with self._tx() as db:
            rows = db.execute("SELECT id, attempts FROM jobs WHERE state = 'running'").fetchall()
            requeued = []
            for row in rows:
                if row["attempts"] >= self.max_attempts:
                    db.execute(
                        "UPDATE jobs SET state = 'interrupted', finished = ?, error = ? "
                        "WHERE id = ?",
                        (time.time(), "the server stopped while this job ran", row["id"]),
                    )
                else:
                    db.execute("UPDATE jobs SET state = 'queued' WHERE id = ?", (row["id"],))
                    requeued.append(row["id"])
        return requeued

    def _move(self, job_id: str, src: str, dst: str, **fields: Any) -> bool:
        result = fields.get("result")
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET state = ?, finished = ?, result = ?, error = ? "
                "WHERE id = ? AND state = ?",
                (
                    dst,
                    time.time(),
                    json.dumps(result) if result is not None else None,
                    fields.get("error"),
                    job_id,
                    src,
                ),
            )
            return cur.rowcount == 1

    # -- reading ----------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        row = self._db().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        job = _job(row)
        if job.state == "queued":
            ahead = (
                self._db()
                .execute(
                    "SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running') AND seq < ?",
                    (row["seq"],),
                )
                .fetchone()[0]
            )
            job = Job(**{**job.__dict__, "position": int(ahead)})
        return job

    def list(self, states: tuple[str, ...] = STATES, limit: int = 100) -> list[Job]:
        """Jobs in the given states, oldest first."""
        marks = ",".join("?" * len(states))
        rows = (
            self._db()
            .execute(
                f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY seq DESC LIMIT ?",
                (*states, limit),
            )
            .fetchall()
        )
        return [_job(r) for r in reversed(rows)]

    def counts(self) -> dict[str, int]:
        rows = self._db().execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        return {r["state"]: int(r["n"]) for r in rows}

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        kind=row["kind"],
        payload=json.loads(row["payload"]),
        state=row["state"],
        attempts=int(row["attempts"]),
        created=float(row["created"]),
        started=row["started"],
        finished=row["finished"],
        result=json.loads(row["result"]) if row["result"] else None,
        error=row["error"],
    )
