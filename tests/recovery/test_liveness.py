"""Workers killed with SIGKILL: their jobs are sent again at once and finish, each captioned once."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from joycap_queue.recovery.requeue import job_ids_in_broker
from tests.support.jobs import all_finished, jobs_in
from tests.support.services import Service, Worker, wait_until

HEARTBEAT = "0.5"  # dead after 2 s without a beat


def kill(worker: Worker) -> None:
    os.killpg(worker.process.pid, signal.SIGKILL)
    worker.process.wait(timeout=10)


def test_a_worker_killed_mid_batch_loses_nothing(
    sqlite_url: str,
    service_for: Callable[[str], Service],
    image_factory: Callable[..., list[Path]],
    tmp_path: Path,
) -> None:
    image_factory(tmp_path / "in", 4)
    service = service_for(sqlite_url)
    service.env["JOYCAP_WORKER_HEARTBEAT_S"] = HEARTBEAT
    service.env["JOYCAP_BATCH_WAIT_MS"] = "60000"  # the four jobs wait in one batch
    doomed = service.start_worker("--engine", "generate", "-b", "8", name="doomed")
    service.cli("submit", str(tmp_path / "in"))
    wait_until(
        lambda: [job.status for job in jobs_in(sqlite_url)] == ["running"] * 4, timeout=60, what="a batch"
    )
    kill(doomed)
    # Their messages are held in Redis, delivered to a worker that no longer exists.
    assert job_ids_in_broker(service.settings()) == {job.id for job in jobs_in(sqlite_url)}

    service.env["JOYCAP_BATCH_WAIT_MS"] = "50"
    service.start_worker(name="next")
    wait_until(all_finished(sqlite_url, 4), timeout=60, what="the jobs to be sent again and finish")
    jobs = jobs_in(sqlite_url)
    # Four in flight when it died: none is blamed (the attempt is given back), each ran alone.
    assert [(job.status, job.attempts) for job in jobs] == [("done", 1)] * 4
    assert all(job.worker and job.worker.startswith("next@") and job.caption for job in jobs), [
        (job.worker, job.caption, job.quality) for job in jobs
    ]
    # Every message is acknowledged: nothing will be delivered a third time.
    wait_until(lambda: not job_ids_in_broker(service.settings()), timeout=10, what="the acks")


def test_an_image_that_kills_its_worker_every_time_fails_after_max_attempts(
    sqlite_url: str,
    service_for: Callable[[str], Service],
    image_factory: Callable[..., list[Path]],
    tmp_path: Path,
) -> None:
    image_factory(tmp_path / "in", 6)
    poison_path = tmp_path / "in" / "poison.png"
    Image.new("RGB", (64, 48), "purple").save(poison_path)
    service = service_for(sqlite_url)
    service.env["JOYCAP_WORKER_HEARTBEAT_S"] = HEARTBEAT
    service.cli("submit", str(tmp_path / "in"))
    # The image, once submitted, becomes a FIFO with no writer: a worker that claims it blocks
    # reading it, as a poison image is still being worked on when it kills its worker. The test
    # used to race a real 1-second caption, and lost whenever the caption ended before its poll
    # came round (the submit's own exit was slower than the workers' first batch).
    poison_path.unlink()
    os.mkfifo(poison_path)
    workers = {name: service.start_worker(name=name) for name in ("a", "b")}

    # The test plays the image that crashes the process: whichever worker claims it is killed
    # with SIGKILL, and comes back under the same name (started in the background, so the other
    # worker's rescue and next claim are watched meanwhile).
    kills = 0
    seen: set[tuple[str, object]] = set()
    restarting: dict[str, Future[Worker]] = {}
    deadline = time.monotonic() + 300  # a bound, not a wait: the loop ends when the job fails
    with ThreadPoolExecutor(max_workers=2) as pool:
        while time.monotonic() < deadline:
            for name, future in list(restarting.items()):
                if future.done():
                    workers[name] = future.result()
                    del restarting[name]
            [poison] = [job for job in jobs_in(sqlite_url) if job.path.endswith("poison.png")]
            if poison.status == "failed":
                break
            key = (poison.worker or "", poison.started_at)
            name = key[0].split("@")[0]
            if poison.status == "running" and key not in seen and name not in restarting:
                seen.add(key)
                kill(workers[name])
                kills += 1
                restarting[name] = pool.submit(service.start_worker, name=name)
            time.sleep(0.05)
        for name, future in restarting.items():
            workers[name] = future.result()
    wait_until(all_finished(sqlite_url, 7), timeout=60, what="every job to finish")

    jobs = {Path(job.path).name: job for job in jobs_in(sqlite_url)}
    poison = jobs.pop("poison.png")
    # Three deaths blamed on it, and any shared with batchmates, which blame nobody.
    assert kills >= 3
    assert poison.status == "failed" and poison.error is not None
    assert poison.error.startswith("gave up after 3 attempts")
    # Its batchmates were never blamed: each finished on its one counted attempt.
    assert all(job.status == "done" and job.caption and job.attempts == 1 for job in jobs.values()), {
        name: (job.status, job.attempts, job.error) for name, job in jobs.items()
    }
    for worker in workers.values():
        assert worker.process.poll() is None  # the workers that came back are still serving
