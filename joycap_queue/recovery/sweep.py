"""Recovery: one entry point that rescues what dead workers held, then resends what Redis lost.

`recover` is run by every worker and watcher at start, by `joycap-queue requeue`, and by every
worker's heartbeat (liveness.py): at once after a death or a Redis wipe, and as a periodic
database-versus-Redis sweep. One process at a time (a Redis lock): two judging one dead worker's
jobs from different snapshots could blame different jobs, and two sweeps could both find one
job without a message and send it twice.

Dead workers: a worker killed with SIGKILL, or on a machine that vanished, stops beating; its
claimed jobs stay `running` and their messages sit in Redis's `unacked` hash, which kombu would
only hand out again after the visibility timeout (two hours by default). Each job goes back to
`queued` and its held message to the head of the queue (or a new one is sent if Redis has none).

Blame: a death counts as an attempt only for a job known to have caused it, one that was alone
in flight; with several in flight none is blamed, and each is marked to run alone next time
(worker/gate.py). So batchmates of an image that kills its worker every time finish, and the
image itself ends `failed` after --max-attempts deaths of its own.

Lost messages: every job the database holds as `queued` (for longer than a send can take), or
as `running` for longer than a job can run, gets a message unless one is still in Redis,
waiting in the queue or delivered and unacknowledged: Redis lost its data, a submit or retry
was interrupted between its commit and its send, a worker died taking a message off the queue.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from celery import Celery
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import LockError, RedisError
from sqlalchemy import select as sql_select
from sqlalchemy.engine import Engine
from sqlmodel import Session, and_, col, exists, or_, select, update

from joycap_queue.config import Settings, mask_url
from joycap_queue.errors import ServiceUnavailable
from joycap_queue.messaging.app import make_celery, send_by_model
from joycap_queue.messaging.broker import held_messages, restore_held, waiting_messages
from joycap_queue.results.sidecars import finish_job_outputs, outputs_missing
from joycap_queue.store import engines, jobstate, leases, queries
from joycap_queue.store.models import Endpoint, Job, JobStatus, utcnow

log = logging.getLogger(__name__)
WORKER_KIND = "worker"
# A worker not seen for this many beats is dead.
STALE_BEATS = 4
# A queued row this young may still be on its way: intake and retry commit rows, then send them.
IN_FLIGHT = timedelta(seconds=30)


def stale_after(settings: Settings) -> timedelta:
    return timedelta(seconds=STALE_BEATS * settings.worker_heartbeat_s)


@dataclass
class RecoverySummary:
    candidates: int = 0
    alive: int = 0
    sent: int = 0
    rescued: int = 0
    # False when another process held the lock and is recovering meanwhile.
    ran: bool = True


def recover(
    settings: Settings,
    app: Celery | None = None,
    *,
    resend: bool = True,
    running_after: timedelta | None = None,
    in_flight: timedelta = IN_FLIGHT,
    wait: float = 0.0,
) -> RecoverySummary:
    """Rescue dead workers' jobs, repair their outputs, then (``resend``) send what has no message.

    ``running_after``: a `running` job older than this with no message is sent again (default:
    the task time limit and a minute). ``wait``: how long to wait for another process's lock;
    with 0, a process that finds it held leaves the work to its holder.
    """
    app = app or make_celery(settings)
    engine = engines.get_engine(settings.effective_database_url)
    try:
        with app.connection_for_write() as connection:
            channel = connection.default_channel
            with rescue_lock(settings, channel, wait=wait) as held:
                if not held:
                    return RecoverySummary(ran=False)
                rescued = rescue_orphans(settings, engine, app, channel)
                rescued += restore_unclaimed(settings, engine, channel)
                finish_outputs_of_dead(engine, stale=stale_after(settings))
                summary = RecoverySummary(rescued=rescued)
                if resend:
                    limit = running_after or timedelta(seconds=settings.task_time_limit_s + 60)
                    with Session(engine) as session:
                        candidates = jobs_to_requeue(session, stale_after=limit, in_flight=in_flight)
                    summary.candidates = len(candidates)
                    summary.sent, summary.alive = resend_lost(
                        settings, engine, app, channel, candidates, limit
                    )
                return summary
    except (KombuOperationalError, RedisError, OSError) as exc:
        raise ServiceUnavailable(f"cannot reach Redis at {mask_url(settings.broker_url)}: {exc}") from None


@contextmanager
def rescue_lock(settings: Settings, channel: Any, *, wait: float = 0.0) -> Iterator[bool]:
    # Expires soon: the worker holding it may be the next one killed.
    ttl = max(5.0, stale_after(settings).total_seconds())
    lock = channel.client.lock(
        f"joycap:rescue:{settings.queue}", timeout=ttl, blocking=wait > 0, blocking_timeout=wait or None
    )
    if not lock.acquire():
        yield False
        return
    try:
        yield True
    finally:
        with suppress(LockError):
            lock.release()


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


def live_job_ids(channel: Any, queue: str) -> set[int]:
    """Job ids with a live message: waiting in the queue (any priority) or delivered, not acked."""
    alive = {message.job_id for _key, message in waiting_messages(channel, queue)}
    alive.update(message.job_id for message in held_messages(channel, queue))
    return alive


def resend_lost(
    settings: Settings, engine: Engine, app: Celery, channel: Any, candidates: Sequence[int], stale: timedelta
) -> tuple[int, int]:
    """Send a message for each candidate Redis holds none for; (sent, still alive)."""
    if not candidates:
        return 0, 0
    alive = live_job_ids(channel, settings.queue)
    lost = [job_id for job_id in candidates if job_id not in alive]
    if not lost:
        return 0, len(candidates)
    # A job running past any time limit with no message left: its claim is void (claims only
    # take queued jobs), so it is queued again, the attempt kept.
    with Session(engine) as session:
        session.execute(
            update(Job)
            .where(
                col(Job.id).in_(lost),
                col(Job.status) == JobStatus.running.value,
                col(Job.started_at) < utcnow() - stale,
            )
            .values(status=JobStatus.queued.value, worker=None, started_at=None)
        )
        session.commit()
    sent = send_by_model(app, queries.models_of(engine, lost), queue=settings.queue)
    log.warning("requeued %d jobs whose messages were lost (of %d waiting)", sent, len(candidates))
    return sent, len(candidates) - len(lost)


def resend_queued(
    settings: Settings, app: Celery, job_ids: Sequence[int], *, in_flight: timedelta = IN_FLIGHT
) -> int:
    """Of these jobs, send those still `queued` past ``in_flight`` that Redis holds no message for.

    What a second `submit` does for the images it finds "already queued": the first may have
    been interrupted between its commit and its send. Under the recovery lock, so a sweep
    running meanwhile cannot send the same job too; younger rows may be a send in progress.
    """
    if not job_ids:
        return 0
    engine = engines.get_engine(settings.effective_database_url)
    cutoff = utcnow() - in_flight
    with Session(engine) as session:
        waiting = [
            job_id
            for start in range(0, len(job_ids), 500)
            for job_id in session.exec(
                select(Job.id).where(
                    col(Job.id).in_(list(job_ids[start : start + 500])),
                    col(Job.status) == JobStatus.queued.value,
                    col(Job.queued_at) < cutoff,
                )
            )
            if job_id is not None
        ]
    if not waiting:
        return 0
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        with rescue_lock(settings, channel, wait=30.0) as held:
            if not held:
                return 0  # the holder's sweep sends them
            sent, _alive = resend_lost(settings, engine, app, channel, waiting, timedelta(0))
            return sent


@dataclass
class Orphan:
    job_id: int
    worker: str
    started_at: datetime
    status: str
    isolation: int


def orphaned_jobs(session: Session, *, stale: timedelta) -> list[Orphan]:
    """Jobs that a dead worker had claimed (`running`) or received and not yet claimed (`queued`).

    A worker restarted under the same name is a new incarnation: a job it took before it started
    belonged to the one that died.
    """
    now = utcnow()
    alive = exists().where(
        and_(
            col(Endpoint.kind) == WORKER_KIND,
            col(Endpoint.url) == col(Job.worker),
            leases.fresh(Endpoint, stale),
            col(Endpoint.started_at) <= col(Job.started_at),
        )
    )
    # A worker that registered and went quiet is dead now, with all of its jobs at once (the
    # blame depends on seeing them together); one never registered is judged by the job's age.
    known = exists().where(col(Endpoint.kind) == WORKER_KIND, col(Endpoint.url) == col(Job.worker))
    query = (
        sql_select(col(Job.id), col(Job.worker), col(Job.started_at), col(Job.status), col(Job.isolation))
        .where(
            col(Job.status).in_(jobstate.ACTIVE),
            col(Job.worker).is_not(None),
            known | (col(Job.started_at) < now - stale),
            ~alive,
        )
        .order_by(col(Job.id))
    )
    return [
        Orphan(job_id, worker, started_at, status, isolation)
        for job_id, worker, started_at, status, isolation in session.execute(query).all()
        if job_id is not None and worker is not None and started_at is not None
    ]


def blame(orphans: list[Orphan]) -> dict[int, bool]:
    """Which of one dead worker's claimed jobs count the death as an attempt.

    The one running alone, if any; else a job that was alone in flight; else none: with several
    in flight nobody knows which killed the worker, so none is blamed and each runs alone next.
    """
    claimed = [o for o in orphans if o.status == JobStatus.running.value]
    alone = [o for o in claimed if o.isolation == 2]
    if alone:
        return {o.job_id: o.isolation == 2 for o in claimed}
    return {o.job_id: len(claimed) == 1 for o in claimed}


def rescue_orphans(settings: Settings, engine: Engine, app: Celery, channel: Any) -> int:
    """Dead workers' claimed and received jobs back to `queued`, their messages back on the queue."""
    with Session(engine) as session:
        orphans = orphaned_jobs(session, stale=stale_after(settings))
    return _hand_out(settings, engine, app, channel, orphans) if orphans else 0


def finish_outputs_of_dead(engine: Engine, *, stale: timedelta) -> int:
    """Write the sidecars (and moves) that dead workers stored a result for but never wrote.

    A worker killed between storing a caption and writing `image.txt` leaves a done job without
    its file. Each dead worker's row is looked at once, then removed: the jobs it finished in its
    last moments get their outputs; jobs that still name it are judged by their age.
    """
    with Session(engine) as session:
        dead = list(
            session.exec(select(Endpoint).where(Endpoint.kind == WORKER_KIND, ~leases.fresh(Endpoint, stale)))
        )
        finished: list[int] = []
        for endpoint in dead:
            finished += [
                job_id
                for job_id in session.exec(
                    select(Job.id).where(
                        col(Job.worker) == endpoint.url,
                        col(Job.status).in_((JobStatus.done.value, JobStatus.failed.value)),
                        col(Job.finished_at) >= endpoint.started_at,
                        col(Job.outputs) != "{}",
                    )
                )
                if job_id is not None
            ]
    written = 0
    for job_id in finished:
        try:
            if outputs_missing(engine, job_id):
                finish_job_outputs(engine, job_id)
                written += 1
        except OSError as exc:
            log.warning("job %s: sidecar or move failed: %s", job_id, exc)
    for endpoint in dead:
        if endpoint.id is not None:
            leases.remove_dead(engine, endpoint.id, stale_after=stale)
    if written:
        log.warning("wrote the outputs of %d jobs whose workers died before writing them", written)
    return written


def _hand_out(settings: Settings, engine: Engine, app: Celery, channel: Any, orphans: list[Orphan]) -> int:
    by_worker: dict[str, list[Orphan]] = {}
    for orphan in orphans:
        by_worker.setdefault(orphan.worker, []).append(orphan)
    rescued: list[int] = []
    for worker_orphans in by_worker.values():
        blamed = blame(worker_orphans)
        for orphan in worker_orphans:
            values: dict[str, Any] = {}
            if orphan.status == JobStatus.running.value:
                values["isolation"] = 1
                if not blamed[orphan.job_id]:  # the claim counted an attempt: give it back
                    values["attempts"] = jobstate.give_back_attempt()
            if jobstate.return_to_queue(
                engine,
                orphan.job_id,
                status=orphan.status,
                worker=orphan.worker,
                started_at=orphan.started_at,
                **values,
            ):
                rescued.append(orphan.job_id)
    if not rescued:
        return 0
    wanted = set(rescued)
    waiting = {m.job_id for _key, m in waiting_messages(channel, settings.queue) if m.job_id in wanted}
    restored: set[int] = set()
    for message in held_messages(channel, settings.queue):
        if message.job_id in wanted and message.tag is not None and message.job_id not in restored:
            restore_held(channel, message.tag)
            restored.add(message.job_id)
    missing = [job_id for job_id in rescued if job_id not in waiting and job_id not in restored]
    if missing:
        send_by_model(app, queries.models_of(engine, missing), queue=settings.queue)
    workers = sorted({o.worker for o in orphans if o.job_id in wanted})
    log.warning("worker %s died: %d of its jobs sent again", ", ".join(workers), len(rescued))
    return len(rescued)


def restore_unclaimed(settings: Settings, engine: Engine, channel: Any) -> int:
    """Hand out again messages delivered long ago to a worker that never took their job.

    A worker killed between receiving a message and claiming its job leaves no trace in the
    database, only the message in `unacked`. A live worker claims within milliseconds of
    delivery, or notes that it holds the job while it waits (`jobstate.receive_job`); so a held
    message older than the stale time whose job is still `queued` and held by nobody, or
    already finished, belongs to a dead worker. Its job is then sent again (or, finished, is
    skipped and acknowledged).
    """
    cutoff = time.time() - stale_after(settings).total_seconds()
    old = {
        tag.decode() if isinstance(tag, bytes) else str(tag)
        for tag in channel.client.zrangebyscore(channel.unacked_index_key, 0, cutoff)
    }
    if not old:
        return 0
    held = {m.job_id: m.tag for m in held_messages(channel, settings.queue) if m.tag in old}
    if not held:
        return 0
    with Session(engine) as session:
        rows = session.execute(
            sql_select(col(Job.id), col(Job.status), col(Job.worker)).where(col(Job.id).in_(held))
        ).all()
    stranded = [
        job_id
        for job_id, status, worker in rows
        if (status == JobStatus.queued.value and worker is None) or status not in jobstate.ACTIVE
    ]
    for job_id in stranded:
        tag = held[job_id]
        assert tag is not None
        restore_held(channel, tag)
    if stranded:
        log.warning("%d messages held by workers that died before taking them sent again", len(stranded))
    return len(stranded)
