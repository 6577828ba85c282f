"""Lost messages are rebuilt from the database, and live ones are never sent twice."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from sqlalchemy import update
from sqlmodel import Session

from joycap_queue.recovery.requeue import job_ids_in_broker, requeue_lost
from joycap_queue.store import engines
from joycap_queue.store.models import Job, utcnow
from tests.support.jobs import all_finished, jobs_in
from tests.support.services import Service, drop_messages, message_count, wait_until


def test_requeue_sends_only_what_redis_lost(
    database_url: str,
    service_for: Callable[[str], Service],
    image_factory: Callable[..., list[Path]],
    tmp_path: Path,
) -> None:
    image_factory(tmp_path / "in", 5)
    service = service_for(database_url)
    settings = service.settings()
    service.call("submit", str(tmp_path / "in"))
    ids = {job.id for job in jobs_in(database_url)}
    assert job_ids_in_broker(settings) == ids

    # Every message still waits in Redis: nothing is sent again.
    summary = requeue_lost(settings, in_flight=timedelta(0))
    assert (summary.candidates, summary.alive, summary.sent) == (5, 5, 0)

    # Redis loses the queue: every job is sent once, and a second requeue sends nothing more.
    drop_messages(settings)
    assert job_ids_in_broker(settings) == set()
    result = service.call("requeue", "--min-age", "0")
    assert "5 jobs waiting: 0 still have their message, 5 sent again" in result.stdout
    assert requeue_lost(settings, in_flight=timedelta(0)).sent == 0
    assert message_count(settings) == 5

    # A job marked running by a worker that vanished long ago, with no message left.
    engine = engines.get_engine(database_url)
    stuck = min(ids)
    drop_messages(settings)
    with Session(engine) as session:
        session.execute(
            update(Job)
            .where(Job.id == stuck)
            .values(status="running", started_at=utcnow() - timedelta(hours=2))
        )
        session.commit()
    summary = requeue_lost(settings, stale_after=timedelta(hours=1), in_flight=timedelta(0))
    assert (summary.candidates, summary.sent) == (5, 5)

    service.start_worker()
    wait_until(all_finished(database_url, 5), timeout=120, what="requeued jobs")
    jobs = jobs_in(database_url)
    assert {job.status for job in jobs} == {"done"}
    assert all(job.caption for job in jobs)


def test_young_queued_jobs_are_left_alone(
    sqlite_url: str,
    service_for: Callable[[str], Service],
    image_factory: Callable[..., list[Path]],
    tmp_path: Path,
) -> None:
    image_factory(tmp_path / "in", 2)
    service = service_for(sqlite_url)
    settings = service.settings()
    service.call("submit", str(tmp_path / "in"))
    drop_messages(settings)
    # Intake commits rows before it sends them: a fresh queued row may be in transit.
    assert requeue_lost(settings).candidates == 0
    assert requeue_lost(settings, in_flight=timedelta(0)).sent == 2
