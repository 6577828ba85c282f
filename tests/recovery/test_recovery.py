"""Recovery: a worker judged dead while alive comes back, and jobs committed without messages are sent."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import redis
from sqlalchemy import delete, update
from sqlmodel import Session, col, select

from joycap_queue.captions.request import RequestOptions, build_request
from joycap_queue.intake.enqueue import _RowBuilder
from joycap_queue.messaging.app import make_celery, send_caption_jobs
from joycap_queue.recovery.requeue import job_ids_in_broker
from joycap_queue.store import engines, jobstate
from joycap_queue.store.models import Endpoint, Job, utcnow
from tests.support.jobs import all_finished, jobs_in
from tests.support.services import Service, drop_messages, message_count, wait_until

HEARTBEAT = "0.5"  # dead after 2 s without a beat; a full sweep every 6 s


def endpoints(database_url: str) -> list[Endpoint]:
    with Session(engines.get_engine(database_url)) as session:
        return list(session.exec(select(Endpoint).where(Endpoint.kind == "worker")))


def test_a_worker_whose_row_was_removed_registers_again_and_keeps_working(
    sqlite_url: str,
    service_for: Callable[[str], Service],
    image_factory: Callable[..., list[Path]],
    tmp_path: Path,
) -> None:
    service = service_for(sqlite_url)
    service.env["JOYCAP_WORKER_HEARTBEAT_S"] = HEARTBEAT
    worker = service.start_worker()
    wait_until(lambda: len(endpoints(sqlite_url)) == 1, timeout=30, what="the worker's row")
    [before] = endpoints(sqlite_url)
    # What the dead-worker cleanup does to a worker that stalled for longer than the stale time.
    with Session(engines.get_engine(sqlite_url)) as session:
        session.execute(delete(Endpoint))
        session.commit()
    wait_until(lambda: len(endpoints(sqlite_url)) == 1, timeout=30, what="the worker to register again")
    [after] = endpoints(sqlite_url)
    assert after.url == before.url and after.owner != before.owner
    # The same incarnation: jobs it claimed before are still its own, not a dead worker's.
    assert after.started_at == before.started_at
    image_factory(tmp_path / "in", 2)
    service.call("submit", str(tmp_path / "in"))
    wait_until(all_finished(sqlite_url, 2), timeout=60, what="the jobs")
    assert {job.status for job in jobs_in(sqlite_url)} == {"done"}
    assert "registering again" in worker.log()


def commit_without_sending(service: Service, paths: list[Path], *, age: timedelta) -> list[int]:
    """Rows as intake commits them, its send never reached (an interrupt in between)."""
    settings = service.settings()
    request = build_request(settings, RequestOptions(caption_type="Descriptive", length="short"))
    rows = _RowBuilder(request)
    engine = engines.get_engine(settings.effective_database_url)
    with Session(engine) as session:
        submission = jobstate.create_submission(session, source=["test"], options="{}", model=request.model)
        values = [{**rows.row(p), "submission_id": submission.id, "queued_at": utcnow() - age} for p in paths]
        inserted = jobstate.insert_jobs(session, values)
        session.commit()
    return sorted(inserted.values())


def test_the_sweep_sends_jobs_committed_but_never_sent(
    sqlite_url: str,
    service_for: Callable[[str], Service],
    image_factory: Callable[..., list[Path]],
    tmp_path: Path,
) -> None:
    service = service_for(sqlite_url)
    service.env["JOYCAP_WORKER_HEARTBEAT_S"] = HEARTBEAT
    # Redis is not new to this queue: no wipe is detected, so only the periodic sweep can help.
    settings = service.settings()
    redis.Redis.from_url(settings.broker_url).set(f"joycap:alive:{settings.queue}", "1")
    service.start_worker()
    # After the worker's start: its start-up recovery cannot be what finds them.
    images = image_factory(tmp_path / "in", 3)
    ids = commit_without_sending(service, images, age=timedelta(minutes=5))
    assert job_ids_in_broker(service.settings()) == set()
    wait_until(all_finished(sqlite_url, 3), timeout=90, what="the sweep to send them")
    assert [(job.id, job.status) for job in jobs_in(sqlite_url)] == [(job_id, "done") for job_id in ids]


def test_a_second_submit_sends_queued_jobs_that_have_no_message(
    database_url: str,
    service_for: Callable[[str], Service],
    image_factory: Callable[..., list[Path]],
    tmp_path: Path,
) -> None:
    image_factory(tmp_path / "in", 3)
    service = service_for(database_url)
    settings = service.settings()
    service.call("submit", str(tmp_path / "in"))
    ids = sorted(job.id for job in jobs_in(database_url))
    # The first submit's messages: two never sent (an interrupt after its commit), one sent.
    drop_messages(settings)
    send_caption_jobs(make_celery(settings), ids[:1], queue=settings.queue, model=settings.model)
    with Session(engines.get_engine(database_url)) as session:
        session.execute(
            update(Job).where(col(Job.id).in_(ids)).values(queued_at=utcnow() - timedelta(minutes=5))
        )
        session.commit()
    result = service.call("submit", str(tmp_path / "in"))
    assert "already queued 3" in result.stdout
    assert job_ids_in_broker(settings) == set(ids)
    # The job whose message was still there got no second one.
    assert message_count(settings) == 3
