"""Which workers are alive, and what happens to the jobs of one that died.

Every worker process registers itself (an `endpoint` row of kind ``worker``, named by its Celery
node name) and refreshes it every ``worker_heartbeat_s``. A worker killed with SIGKILL, or on a
machine that vanished, stops refreshing; its claimed jobs stay `running` and their messages sit
in Redis's `unacked` hash, which kombu would only hand out again after the visibility timeout
(two hours by default). Every live worker looks for such orphans on each beat and rescues them
at once: each job goes back to `queued` and its held message to the head of the queue (or a new
one is sent if Redis has none).

Blame: a death counts as an attempt only for a job known to have caused it, one that was alone
in flight; with several in flight none is blamed, and each is marked to run alone next time
(worker/gate.py). So batchmates of an image that kills its worker every time finish, and the
image itself ends `failed` after --max-attempts deaths of its own.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from celery import Celery
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import LockError, RedisError
from sqlalchemy import select as sql_select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, and_, col, exists, select

from joycap_queue import db
from joycap_queue.broker import held_messages, restore_held, waiting_messages
from joycap_queue.config import Settings
from joycap_queue.models import Endpoint, Job, JobStatus, utcnow
from joycap_queue.queue import make_celery, send_caption_jobs
from joycap_queue.sidecars import finish_job_outputs, outputs_missing

log = logging.getLogger(__name__)
WORKER_KIND = "worker"
# A worker not seen for this many beats is dead.
STALE_BEATS = 4


def stale_after(settings: Settings) -> timedelta:
    return timedelta(seconds=STALE_BEATS * settings.worker_heartbeat_s)


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
            col(Endpoint.heartbeat_at) >= now - stale,
            col(Endpoint.started_at) <= col(Job.started_at),
        )
    )
    # A worker that registered and went quiet is dead now, with all of its jobs at once (the
    # blame depends on seeing them together); one never registered is judged by the job's age.
    known = exists().where(col(Endpoint.kind) == WORKER_KIND, col(Endpoint.url) == col(Job.worker))
    query = (
        sql_select(col(Job.id), col(Job.worker), col(Job.started_at), col(Job.status), col(Job.isolation))
        .where(
            col(Job.status).in_(db.ACTIVE),
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


def rescue(settings: Settings, app: Celery | None = None) -> int:
    """Hand out again what dead workers held; returns how many jobs were sent again.

    Their claimed jobs (`rescue_orphans`), the messages they took and never claimed
    (`restore_unclaimed`) and the outputs they never wrote, over one Redis connection, by one
    process at a time: every live worker tries on every beat, and two judging one dead worker's
    jobs from different snapshots could blame different jobs.
    """
    app = app or make_celery(settings)
    engine = db.get_engine(settings.effective_database_url)
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        # Expires soon: the worker holding it may be the next one killed.
        ttl = max(5.0, stale_after(settings).total_seconds())
        lock = channel.client.lock(f"joycap:rescue:{settings.queue}", timeout=ttl, blocking=False)
        if not lock.acquire():
            return 0
        try:
            rescued = rescue_orphans(settings, engine, app, channel)
            rescued += restore_unclaimed(settings, engine, channel)
            finish_outputs_of_dead(engine, stale=stale_after(settings))
            return rescued
        finally:
            with suppress(LockError):
                lock.release()


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
    now = utcnow()
    with Session(engine) as session:
        dead = list(
            session.exec(
                select(Endpoint).where(Endpoint.kind == WORKER_KIND, col(Endpoint.heartbeat_at) < now - stale)
            )
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
            db.release_endpoint(engine, endpoint.id)
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
                    values["attempts"] = db.give_back_attempt()
            if db.return_to_queue(
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
        send_caption_jobs(app, missing, queue=settings.queue)
    workers = sorted({o.worker for o in orphans if o.job_id in wanted})
    log.warning("worker %s died: %d of its jobs sent again", ", ".join(workers), len(rescued))
    return len(rescued)


def restore_unclaimed(settings: Settings, engine: Engine, channel: Any) -> int:
    """Hand out again messages delivered long ago to a worker that never took their job.

    A worker killed between receiving a message and claiming its job leaves no trace in the
    database, only the message in `unacked`. A live worker claims within milliseconds of
    delivery, or notes that it holds the job while it waits (`db.receive_job`); so a held
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
        if (status == JobStatus.queued.value and worker is None) or status not in db.ACTIVE
    ]
    for job_id in stranded:
        tag = held[job_id]
        assert tag is not None
        restore_held(channel, tag)
    if stranded:
        log.warning("%d messages held by workers that died before taking them sent again", len(stranded))
    return len(stranded)


def broker_was_wiped(settings: Settings, app: Celery) -> bool:
    """True once after Redis lost its data (and on a brand-new Redis): a marker key is gone.

    SET NX: of all the workers noticing at once, one answers True and does the resending.
    """
    with app.connection_for_write() as connection:
        client = connection.default_channel.client
        return bool(client.set(f"joycap:alive:{settings.queue}", "1", nx=True))


def requeue_lost(settings: Settings, *, in_flight: timedelta) -> None:
    from joycap_queue.requeue import requeue_lost as requeue  # requeue builds on this module

    requeue(settings, in_flight=in_flight)


class WorkerHeartbeat:
    """Registers this worker process, keeps it fresh, and rescues dead workers' jobs on each beat."""

    def __init__(self, settings: Settings, name: str) -> None:
        self.settings = settings
        self.name = name
        self.engine = db.get_engine(settings.effective_database_url)
        self.app = make_celery(settings)
        self.endpoint_id: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> WorkerHeartbeat:
        self.endpoint_id = db.register_endpoint(
            self.engine, kind=WORKER_KIND, url=self.name, host=socket.gethostname(), pid=os.getpid()
        )
        self._thread = threading.Thread(target=self._run, name="joycap-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        sweep_at: float | None = None
        while not self._stop.wait(self.settings.worker_heartbeat_s):
            try:
                assert self.endpoint_id is not None
                db.heartbeat_endpoint(self.engine, self.endpoint_id)
                if broker_was_wiped(self.settings, self.app):
                    # Redis restarted without its data: every waiting message is gone. Compare
                    # now, and once more when sends in flight during the loss have landed.
                    log.warning("Redis lost its data: sending again every job it no longer holds")
                    requeue_lost(self.settings, in_flight=stale_after(self.settings))
                    sweep_at = time.monotonic() + stale_after(self.settings).total_seconds()
                if rescue(self.settings, self.app):
                    # A worker killed while it took a message off the queue, before Redis filed
                    # it as delivered, lost it outright: once the dust settles, a full
                    # comparison of the database with Redis resends it.
                    sweep_at = time.monotonic() + stale_after(self.settings).total_seconds()
                if sweep_at is not None and time.monotonic() >= sweep_at:
                    sweep_at = None
                    requeue_lost(self.settings, in_flight=stale_after(self.settings))
            except (SQLAlchemyError, KombuOperationalError, RedisError, OSError) as exc:
                # The database or Redis is away for a moment: the next beat tries again.
                log.warning("heartbeat: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.endpoint_id is not None:
            try:
                db.release_endpoint(self.engine, self.endpoint_id)
            except SQLAlchemyError as exc:
                log.warning("could not unregister worker %s: %s", self.name, type(exc).__name__)
