"""`requeue`: rebuild lost messages from the database, the source of truth.

Jobs of a worker that died (SIGKILL, a lost machine) are sent again first, by
`liveness.rescue`, which every live worker also runs on each heartbeat.

When Redis loses its data (a restart without persistence, a flush, a failover), every job the
database holds as `queued`, or as `running` for longer than a job can run, has no message left.
Requeueing sends one for each such job whose message is not still in Redis, waiting in the
queue or delivered and unacknowledged, so no job is ever sent twice while its first message is
alive.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import RedisError
from sqlmodel import Session, col, or_, select, update

from joycap_queue import db
from joycap_queue.broker import held_messages, waiting_messages
from joycap_queue.config import Settings, mask_url
from joycap_queue.errors import ServiceUnavailable
from joycap_queue.liveness import rescue
from joycap_queue.models import Job, JobStatus, utcnow
from joycap_queue.queue import make_celery, send_caption_jobs

log = logging.getLogger(__name__)
# A queued row this young may still be on its way: intake commits rows, then sends them.
IN_FLIGHT = timedelta(seconds=30)


@dataclass
class RequeueSummary:
    candidates: int = 0
    alive: int = 0
    sent: int = 0
    rescued: int = 0


def job_ids_in_broker(settings: Settings) -> set[int]:
    """Job ids with a live message: waiting in the queue (any priority) or delivered, not acked."""
    app = make_celery(settings)
    try:
        with app.connection_for_read() as connection:
            channel = connection.default_channel
            alive = {message.job_id for _key, message in waiting_messages(channel, settings.queue)}
            alive.update(message.job_id for message in held_messages(channel, settings.queue))
            return alive
    except (KombuOperationalError, RedisError, OSError) as exc:
        raise ServiceUnavailable(f"cannot reach Redis at {mask_url(settings.broker_url)}: {exc}") from None


def jobs_to_requeue(
    session: Session, *, stale_after: timedelta, in_flight: timedelta = IN_FLIGHT
) -> list[int]:
    """Jobs the database says are waiting, or running for longer than any job can take."""
    now = utcnow()
    query = (
        select(Job.id)
        .where(
            or_(
                (col(Job.status) == JobStatus.queued.value) & (col(Job.queued_at) < now - in_flight),
                (col(Job.status) == JobStatus.running.value) & (col(Job.started_at) < now - stale_after),
            )
        )
        .order_by(col(Job.id))
    )
    return [job_id for job_id in session.exec(query) if job_id is not None]


def requeue_lost(
    settings: Settings, *, stale_after: timedelta | None = None, in_flight: timedelta = IN_FLIGHT
) -> RequeueSummary:
    """Send a message for every waiting job whose message Redis no longer holds."""
    stale_after = stale_after or timedelta(seconds=settings.task_time_limit_s + 60)
    engine = db.get_engine(settings.effective_database_url)
    try:
        rescued = rescue(settings)
    except (KombuOperationalError, RedisError, OSError) as exc:
        raise ServiceUnavailable(f"cannot reach Redis at {mask_url(settings.broker_url)}: {exc}") from None
    with Session(engine) as session:
        candidates = jobs_to_requeue(session, stale_after=stale_after, in_flight=in_flight)
    summary = RequeueSummary(candidates=len(candidates), rescued=rescued)
    if not candidates:
        return summary
    alive = job_ids_in_broker(settings)
    lost = [job_id for job_id in candidates if job_id not in alive]
    summary.alive = len(candidates) - len(lost)
    if lost:
        # A job running past any time limit with no message left: its claim is void (claims
        # only take queued jobs), so it is queued again, the attempt kept.
        with Session(engine) as session:
            session.execute(
                update(Job)
                .where(
                    col(Job.id).in_(lost),
                    col(Job.status) == JobStatus.running.value,
                    col(Job.started_at) < utcnow() - stale_after,
                )
                .values(status=JobStatus.queued.value, worker=None, started_at=None)
            )
            session.commit()
        summary.sent = send_caption_jobs(make_celery(settings), lost, queue=settings.queue)
        log.warning(
            "requeued %d jobs whose messages were lost (of %d waiting)", summary.sent, len(candidates)
        )
    return summary
