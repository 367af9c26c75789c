"""The persistent job queue: transitions, ordering, cancel, crash recovery, concurrency."""

from __future__ import annotations

import threading

from emaki.server.jobs import JobStore


def test_jobs_run_in_order_and_finish_once(tmp_path) -> None:
    store = JobStore(tmp_path / "jobs.db")
    a = store.submit("txt2img", {"prompt": "a"})
    b = store.submit("txt2img", {"prompt": "b"})
    assert (a.state, a.position, b.position) == ("queued", 0, 1)
    first = store.claim()
    assert first is not None and first.id == a.id and first.state == "running"
    assert first.attempts == 1 and first.payload == {"prompt": "a"}
    assert store.finish(a.id, {"images": ["x.png"]})
    assert not store.finish(a.id, {"images": ["y.png"]})  # a second finish is refused
    assert store.get(a.id).result == {"images": ["x.png"]}
    assert store.get(b.id).position == 0
    assert store.claim().id == b.id and store.claim() is None


def test_cancel_queued_at_once_running_by_the_worker(tmp_path) -> None:
    store = JobStore(tmp_path / "jobs.db")
    a, b = store.submit("t", {}), store.submit("t", {})
    store.claim()
    assert store.cancel(b.id) == "cancelled" and store.get(b.id).state == "cancelled"
    assert store.cancel(a.id) == "running"  # the worker stops it and records the state
    assert store.fail(a.id, "cancelled by request", state="cancelled")
    assert store.cancel(a.id) is None and store.cancel("nope") is None
    assert store.claim() is None


def test_recovery_requeues_running_jobs_then_gives_up(tmp_path) -> None:
    path = tmp_path / "jobs.db"
    store = JobStore(path, max_attempts=2)
    job = store.submit("t", {"n": 1})
    store.claim()
    store.close()  # the process "dies" with the job running
    again = JobStore(path, max_attempts=2)
    assert again.recover() == [job.id]
    assert again.get(job.id).state == "queued"
    assert again.claim().attempts == 2
    third = JobStore(path, max_attempts=2)
    assert third.recover() == []
    assert third.get(job.id).state == "interrupted"  # never reported as done


def test_concurrent_claims_never_take_a_job_twice(tmp_path) -> None:
    store = JobStore(tmp_path / "jobs.db")
    ids = {store.submit("t", {"i": i}).id for i in range(40)}
    taken: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        while (job := store.claim()) is not None:
            with lock:
                taken.append(job.id)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(taken) == sorted(ids)
    assert store.counts() == {"running": 40}
