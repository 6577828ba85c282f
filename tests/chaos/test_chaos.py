"""Chaos: 200 images through two real workers on PostgreSQL while things break.

During the run one worker is killed with SIGKILL twice (and comes back), Redis is restarted
with its data wiped once, and broken images are planted. At the end every good image is done
with one caption, every bad one failed with its reason, nothing is queued or running, and every
sidecar holds exactly the caption in the database.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from joycap_queue.ops.services import start_redis
from joycap_queue.results.sidecars import sidecar_path
from tests.support.images import make_odd_images
from tests.support.jobs import jobs_in
from tests.support.services import Service, Worker, wait_until

GOOD = 200


def done_count(database_url: str) -> int:
    return sum(job.status == "done" for job in jobs_in(database_url))


def kill_and_restart(service: Service, worker: Worker, name: str) -> Worker:
    os.killpg(worker.process.pid, signal.SIGKILL)
    worker.process.wait(timeout=10)
    return service.start_worker(name=name)


@pytest.mark.postgres
def test_chaos(
    postgres_url: str,
    service_for: Callable[[str], Service],
    image_factory: Callable[..., list[Path]],
    tmp_path: Path,
) -> None:
    redis = start_redis(tmp_path / "redis")  # this test's own: it is wiped mid-run
    service = service_for(postgres_url)
    service.env.update(
        JOYCAP_BROKER_URL=redis.url,
        JOYCAP_WORKER_HEARTBEAT_S="0.5",
        JOYCAP_MAX_IMAGE_PIXELS=str(20_000_000),
    )
    workers: dict[str, Worker] = {}
    try:
        good = image_factory(tmp_path / "good", GOOD)
        workers = {name: service.start_worker(name=name) for name in ("a", "b")}
        service.cli("submit", str(tmp_path / "good"), "--sidecar", "txt")

        wait_until(lambda: done_count(postgres_url) >= 20, timeout=120, what="20 captions")
        workers["a"] = kill_and_restart(service, workers["a"], "a")

        must_fail, odd_good = make_odd_images(tmp_path / "odd")
        # Files changed after submit need a worker that has not got to them yet: they are
        # tests/intake/test_bad_images.py's, not this busy run's.
        for name in ("deleted-after-submit.png", "replaced-after-submit.png"):
            (tmp_path / "odd" / name).unlink()
            del must_fail[name]
        service.cli("submit", str(tmp_path / "odd"), "--sidecar", "txt")

        wait_until(lambda: done_count(postgres_url) >= 80, timeout=120, what="80 captions")
        port, workdir = redis.port, redis.workdir
        redis.stop()  # no persistence: everything it held is gone
        time.sleep(1)
        redis = start_redis(workdir, port=port)

        wait_until(lambda: done_count(postgres_url) >= 140, timeout=120, what="140 captions")
        workers["a"] = kill_and_restart(service, workers["a"], "a")

        total = GOOD + len(must_fail) + len(odd_good)

        def settled() -> bool:
            jobs = jobs_in(postgres_url)
            if len(jobs) != total or any(job.status not in ("done", "failed") for job in jobs):
                return False
            # A worker killed between storing a caption and writing its sidecar leaves the file
            # to a living worker's sweep (finish_outputs_of_dead): the files follow the rows.
            return all(sidecar_path(Path(job.path), ".txt").exists() for job in jobs if job.status == "done")

        wait_until(settled, timeout=240, interval=0.5, what="every job to finish")
        for worker in workers.values():
            assert worker.process.poll() is None
    finally:
        # Workers first: without their broker they would spend their shutdown reconnecting.
        for worker in workers.values():
            worker.stop()
        redis.stop()

    jobs = jobs_in(postgres_url)
    by_path: dict[str, list[object]] = {}
    for job in jobs:
        by_path.setdefault(job.path, []).append(job)
    assert all(len(rows) == 1 for rows in by_path.values())
    by_name = {Path(job.path).name: job for job in jobs if "/odd/" in job.path}
    for name, reason in must_fail.items():
        job = by_name[name]
        assert job.status == "failed" and job.error is not None and reason in job.error, (name, job.error)
    for path in [*good, *odd_good]:
        [job] = by_path[str(path)]
        assert job.status == "done" and job.caption is not None, (path.name, job.status, job.error)
        # Bytes: a caption's \r must not be read as a newline.
        assert sidecar_path(path, ".txt").read_bytes().decode("utf-8") == job.caption, path.name
    assert {job.status for job in jobs} == {"done", "failed"}
    print(
        f"chaos: {len(jobs)} jobs, {sum(j.status == 'done' for j in jobs)} done, "
        f"{sum(j.status == 'failed' for j in jobs)} failed, "
        f"{sum(j.attempts > 1 for j in jobs)} needed more than one attempt"
    )
