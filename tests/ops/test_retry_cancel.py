"""`cancel`, `retry` and `forget` against a real Redis, a real worker and real databases."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from PIL import Image
from sqlalchemy import update
from sqlmodel import Session, col

from joycap_queue.config import DEFAULT_MODEL, Settings
from joycap_queue.messaging.app import make_celery, send_caption_jobs
from joycap_queue.store import engines
from joycap_queue.store.models import Job, utcnow
from tests.support.jobs import jobs_in
from tests.support.services import Service, message_count, wait_until


def flat_images(folder: Path, count: int, *, seed: int) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        path = folder / f"img{i}.png"
        Image.new("RGB", (32 + i, 24), (seed * 50 % 256, i * 40, 120)).save(path)
        paths.append(path)
    return paths


def queue_length(service: Service) -> int:
    return message_count(service.settings())


def statuses(database_url: str, folder: Path) -> list[str]:
    return [job.status for job in jobs_in(database_url) if Path(job.path).parent == folder]


def test_cancelled_jobs_leave_the_queue_and_workers_skip_them(
    database_url: str,
    service_for: Callable[[str], Service],
    tmp_path: Path,
) -> None:
    later = tmp_path / "later"
    now = tmp_path / "now"
    flat_images(later, 4, seed=1)
    flat_images(now, 2, seed=2)
    service = service_for(database_url)
    service.call("submit", str(later), "--greedy")
    service.call("submit", str(now), "--greedy")
    assert queue_length(service) == 6

    cancelled = service.call("cancel", "--submission", "1")
    assert "cancelled 4 queued jobs" in cancelled.stdout, cancelled.stdout
    assert "removed 4 messages from the queue" in cancelled.stderr, cancelled.stderr
    assert queue_length(service) == 2
    assert statuses(database_url, later) == ["cancelled"] * 4

    # Submitting a cancelled image again queues it again; cancelling by path takes it off again.
    resubmitted = service.call("submit", str(later), "--greedy")
    assert "queued 4" in resubmitted.stdout, resubmitted.stdout
    assert "cancelled 4" in service.call("cancel", "--path", f"{later}/*").stdout
    assert queue_length(service) == 2

    # Messages a worker already held when the jobs were cancelled: sent again here, they reach
    # the worker, which must skip them.
    later_ids = [job.id for job in jobs_in(database_url) if Path(job.path).parent == later]
    settings = Settings(broker_url=service.env["JOYCAP_BROKER_URL"], queue=service.env["JOYCAP_QUEUE"])
    send_caption_jobs(make_celery(settings), [i for i in later_ids if i is not None], queue=settings.queue)
    worker = service.start_worker()
    wait_until(
        lambda: (
            statuses(database_url, now) == ["done", "done"] and worker.log().count("already cancelled") == 4
        ),
        timeout=120,
        what="the worker to caption 2 jobs and skip 4 cancelled ones",
    )
    assert queue_length(service) == 0
    for job in jobs_in(database_url):
        if Path(job.path).parent == later:
            assert (job.status, job.attempts, job.caption, job.error) == ("cancelled", 0, None, "cancelled")

    listed = service.call("results", "--state", "cancelled", "--jsonl")
    assert len(listed.stdout.splitlines()) == 4
    assert "cancelled 0 queued jobs" in service.call("cancel", "--path", "*/nowhere/*").stdout

    retried = service.call("retry", "--state", "cancelled", "--path", f"{later}/*")
    assert "queued 4 jobs again" in retried.stdout, retried.stdout
    wait_until(
        lambda: statuses(database_url, later) == ["done"] * 4, timeout=120, what="retried jobs to finish"
    )


def test_retry_failed_jobs_with_changed_options(
    sqlite_url: str,
    service_for: Callable[[str], Service],
    tmp_path: Path,
) -> None:
    images = flat_images(tmp_path / "in", 3, seed=5)
    service = service_for(sqlite_url)
    tiny = service.env["JOYCAP_MODEL"]
    # One image is also captioned with the options the retry will ask for: that job exists already.
    twin = service.call("submit", str(images[0]), "-l", "20", "--max-new-tokens", "8")
    assert "queued 1" in twin.stdout
    # These ask for the real model: the tiny model's worker never takes them (they are routed to
    # that model's queue), so they wait until cancelled, then fail as cancelled jobs are retried.
    service.call("submit", str(tmp_path / "in"), "--model", DEFAULT_MODEL)
    service.start_worker()

    def failed() -> list[Job]:
        return [job for job in jobs_in(sqlite_url) if job.status == "failed"]

    wait_until(
        lambda: [job.status for job in jobs_in(sqlite_url)] == ["done", "queued", "queued", "queued"],
        timeout=120,
        what="the twin to be captioned",
    )
    assert [job.attempts for job in jobs_in(sqlite_url)][1:] == [0, 0, 0]
    with Session(engines.get_engine(sqlite_url)) as session:
        # As a worker of the real model that could not read them would leave them.
        session.execute(
            update(Job).where(col(Job.model) == DEFAULT_MODEL).values(status="failed", error="could not load")
        )
        session.commit()
    before = {job.id: job for job in failed()}
    assert len(before) == 3

    retried = service.call("retry", "--model", tiny, "-l", "20", "--max-new-tokens", "8")
    assert "queued 2 jobs again with the new options" in retried.stdout, retried.stdout
    assert "already has that request (done)" in retried.stderr, retried.stderr
    wait_until(
        lambda: sorted(job.status for job in jobs_in(sqlite_url)) == ["done", "done", "done", "failed"],
        timeout=120,
        what="2 retried jobs to be captioned",
    )
    jobs = {job.id: job for job in jobs_in(sqlite_url)}
    assert len(jobs) == 4
    for job_id, old in before.items():
        job = jobs[job_id]
        if job.status == "failed":
            assert job.path == str(images[0].resolve()) and job.model == DEFAULT_MODEL
            continue
        assert job.status == "done" and job.caption, job.error
        assert job.model == tiny and job.dedup_key != old.dedup_key
        assert json.loads(job.gen_params)["max_new_tokens"] == 8
        assert "20 words or less" in job.prompt and job.caption_type == old.caption_type


def test_forget_asks_then_deletes_a_submission(
    sqlite_url: str,
    service_for: Callable[[str], Service],
    tmp_path: Path,
) -> None:
    flat_images(tmp_path / "a", 3, seed=3)
    flat_images(tmp_path / "b", 2, seed=4)
    service = service_for(sqlite_url)
    service.call("submit", str(tmp_path / "a"))
    service.call("submit", str(tmp_path / "b"))
    assert queue_length(service) == 5

    refused = service.cli("forget", "--submission", "1", check=False)
    assert refused.returncode == 1 and "Delete submission 1 and its 3 jobs (queued 3)" in refused.stderr
    assert len(jobs_in(sqlite_url)) == 5

    forgotten = service.call("forget", "--submission", "1", "--yes")
    assert "submission 1: deleted 3 jobs" in forgotten.stdout, forgotten.stdout
    assert [Path(job.path).parent.name for job in jobs_in(sqlite_url)] == ["b", "b"]
    assert queue_length(service) == 2
    status = service.call("status", "--submission", "1")
    assert "(total 0)" in status.stdout

    unknown = service.cli("forget", "--submission", "99", "--yes", check=False)
    assert unknown.returncode == 1 and "no submission 99" in unknown.stderr
    # Forgotten images are new again.
    assert "queued 3" in service.call("submit", str(tmp_path / "a")).stdout


def test_retry_and_force_clear_a_run_alone_mark_left_by_crashes(
    database_url: str,
    service_for: Callable[[str], Service],
    tmp_path: Path,
) -> None:
    folder = tmp_path / "crashed"
    flat_images(folder, 3, seed=6)
    service = service_for(database_url)
    service.call("submit", str(folder))
    engine = engines.get_engine(database_url)

    def crashed(status: str) -> None:
        # As the heartbeat leaves jobs whose worker died with them: marked to run alone (1), or
        # caught running alone (2) and given up on after the last death.
        with Session(engine) as session:
            session.execute(update(Job).values(status=status, isolation=2, attempts=4, finished_at=utcnow()))
            session.execute(update(Job).where(col(Job.id) == 1).values(isolation=1))
            session.commit()

    def marks() -> list[tuple[str, int, int]]:
        return [(job.status, job.isolation, job.attempts) for job in jobs_in(database_url)]

    crashed("failed")
    assert "queued 3 jobs again" in service.call("retry").stdout
    assert marks() == [("queued", 0, 0)] * 3
    crashed("failed")
    assert "queued 3 jobs again with the new options" in service.call("retry", "-l", "20").stdout
    assert marks() == [("queued", 0, 0)] * 3
    crashed("done")
    assert "queued 3" in service.call("submit", str(folder), "-l", "20", "--force").stdout
    assert marks() == [("queued", 0, 0)] * 3
    # Nothing keeps them apart now: one worker takes them together, each on one attempt.
    service.start_worker()
    wait_until(lambda: {s for s, _, _ in marks()} == {"done"}, timeout=120, what="the three jobs")
    assert marks() == [("done", 0, 1)] * 3
