"""SIGTERM: a real worker lets its jobs finish within the grace, or hands them back to the queue."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

from joycap_queue.recovery.requeue import job_ids_in_broker
from tests.support.jobs import all_finished, jobs_in
from tests.support.services import Service, Worker, wait_until


def running(database_url: str, count: int) -> Callable[[], bool]:
    return lambda: sum(job.status == "running" for job in jobs_in(database_url)) == count


def terminate(worker: Worker, *, within: float) -> None:
    os.killpg(worker.process.pid, signal.SIGTERM)
    wait_until(lambda: worker.process.poll() is not None, timeout=within, what="the worker to exit")


def test_jobs_past_the_grace_go_back_to_the_queue_uncounted(
    sqlite_url: str,
    service_for: Callable[[str], Service],
    image_factory: Callable[..., list[Path]],
    tmp_path: Path,
) -> None:
    image_factory(tmp_path / "in", 3)
    service = service_for(sqlite_url)
    # Batches of 8 that wait a minute to fill: three jobs sit in the batcher, uncaptioned.
    service.env["JOYCAP_BATCH_WAIT_MS"] = "60000"
    slow = service.start_worker("--engine", "generate", "-b", "8", "--shutdown-grace", "1", name="slow")
    service.cli("submit", str(tmp_path / "in"))
    wait_until(running(sqlite_url, 3), timeout=60, what="three jobs in flight")
    terminate(slow, within=30)
    assert "handed 3 jobs back to the queue" in slow.log()
    jobs = jobs_in(sqlite_url)
    assert [(job.status, job.attempts, job.worker) for job in jobs] == [("queued", 0, None)] * 3
    assert job_ids_in_broker(service.settings()) == {job.id for job in jobs}

    service.env["JOYCAP_BATCH_WAIT_MS"] = "50"
    service.start_worker(name="next")
    wait_until(all_finished(sqlite_url, 3), timeout=60, what="the jobs on the next worker")
    assert [(job.status, job.attempts) for job in jobs_in(sqlite_url)] == [("done", 1)] * 3


def test_jobs_within_the_grace_finish_before_the_worker_exits(
    sqlite_url: str,
    service_for: Callable[[str], Service],
    image_factory: Callable[..., list[Path]],
    tmp_path: Path,
) -> None:
    image_factory(tmp_path / "in", 2)
    service = service_for(sqlite_url)
    service.env["JOYCAP_BATCH_WAIT_MS"] = "3000"
    worker = service.start_worker("--engine", "generate", "-b", "8", "--shutdown-grace", "60")
    service.cli("submit", str(tmp_path / "in"))
    wait_until(running(sqlite_url, 2), timeout=60, what="two jobs in flight")
    terminate(worker, within=40)
    assert [(job.status, job.attempts) for job in jobs_in(sqlite_url)] == [("done", 1)] * 2
    assert "handed" not in worker.log()
