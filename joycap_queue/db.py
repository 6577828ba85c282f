"""Engine, schema and the few writes that must be idempotent.

Every state change of a job is one conditional UPDATE, so a redelivered message, a second worker
holding the same job or a retried write can never give a job two captions or undo a result.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import Table, bindparam, case, event, func, inspect, or_, update
from sqlalchemy import text as sql_text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import (
    ArgumentError,
    IntegrityError,
    InterfaceError,
    NoSuchModuleError,
    OperationalError,
    ProgrammingError,
)
from sqlmodel import Session, SQLModel, col, create_engine, select
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_delay, wait_exponential_jitter

from joycap_queue.config import mask_url
from joycap_queue.errors import OptionError, ServiceUnavailable
from joycap_queue.leases import fresh
from joycap_queue.models import Endpoint, Job, JobPublic, JobStatus, Submission, Watcher, utcnow
from joycap_queue.modelspec import spec_key
from joycap_queue.search import WhereClause, caption_matches, ensure_search_index

log = logging.getLogger(__name__)
ACTIVE = (JobStatus.queued.value, JobStatus.running.value)


def normalize_url(url: str) -> str:
    """Accept the URLs people paste (``postgres://``, ``postgresql://``) and pick the psycopg 3 driver."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the CLI read while workers write; busy_timeout turns short lock waits into waits,
    # not "database is locked" errors, when several worker processes share one file.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def get_engine(url: str) -> Engine:
    """One engine per database URL and process; the schema is created on first use."""
    with _engines_lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = _make_engine(url)
        return engine


def dispose_engines() -> None:
    """Close every pooled connection (tests, and processes about to fork)."""
    with _engines_lock:
        for engine in _engines.values():
            engine.dispose()
            _write_locks.pop(engine, None)
        _engines.clear()


def _make_engine(url: str) -> Engine:
    url = normalize_url(url)
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise OptionError("database_url", f"malformed database URL: {mask_url(url)}") from None
    try:
        if parsed.get_backend_name() == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            # A worker's task threads each hold a connection for a moment: with fewer pooled than
            # threads, the overflow is opened (and its pragmas run) and closed again on every job.
            engine = create_engine(
                url, connect_args={"timeout": 30, "check_same_thread": False}, pool_size=32, max_overflow=32
            )
            _write_locks[engine] = threading.Lock()
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            # A connect that hangs (a network dropping packets) would block a heartbeat thread
            # for good and make a live worker look dead: give up after 10 s and retry instead.
            engine = create_engine(
                url, pool_pre_ping=True, pool_size=5, max_overflow=10, connect_args={"connect_timeout": 10}
            )
    except NoSuchModuleError:
        raise OptionError("database_url", f"unsupported database URL: {mask_url(url)}") from None
    try:
        _create_schema(engine)
    except OperationalError as exc:
        engine.dispose()
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else "connection failed"
        raise ServiceUnavailable(f"cannot reach the database at {mask_url(url)}: {reason}") from None
    return engine


def _create_schema(engine: Engine, *, attempts: int = 5) -> None:
    # Processes starting together on a new database (the demo's worker and submit, two workers)
    # race to create the tables: the loser sees "already exists". Its next look finds them.
    for attempt in range(attempts):
        try:
            SQLModel.metadata.create_all(engine)
            _add_missing_columns(engine)
            ensure_search_index(engine)
            return
        except (OperationalError, ProgrammingError, IntegrityError) as exc:
            text = str(exc.orig or exc).lower()
            racing = "already exists" in text or "duplicate key" in text
            if not racing or attempt == attempts - 1:
                raise
            time.sleep(0.1 * (attempt + 1))


# Columns added after the first release, with the DDL that adds them to an older database.
ADDED_COLUMNS = {
    ("job", "isolation"): "ALTER TABLE job ADD COLUMN isolation INTEGER NOT NULL DEFAULT 0",
    ("job", "claim_id"): "ALTER TABLE job ADD COLUMN claim_id VARCHAR(64)",
    ("job", "quantize"): "ALTER TABLE job ADD COLUMN quantize TEXT NOT NULL DEFAULT 'none'",
    ("job", "adapter"): "ALTER TABLE job ADD COLUMN adapter TEXT NOT NULL DEFAULT ''",
    ("job", "adapter_hash"): "ALTER TABLE job ADD COLUMN adapter_hash TEXT NOT NULL DEFAULT ''",
    ("watcher", "owner"): "ALTER TABLE watcher ADD COLUMN owner VARCHAR(64)",
    ("endpoint", "owner"): "ALTER TABLE endpoint ADD COLUMN owner VARCHAR(64)",
    ("endpoint", "state"): "ALTER TABLE endpoint ADD COLUMN state TEXT",
    ("job", "cleanup"): "ALTER TABLE job ADD COLUMN cleanup TEXT NOT NULL DEFAULT '{}'",
    ("job", "raw_caption"): "ALTER TABLE job ADD COLUMN raw_caption TEXT",
    ("job", "quality"): "ALTER TABLE job ADD COLUMN quality TEXT",
    ("job", "caption_attempts"): "ALTER TABLE job ADD COLUMN caption_attempts INTEGER NOT NULL DEFAULT 0",
    ("job", "quality_flags"): "ALTER TABLE job ADD COLUMN quality_flags TEXT NOT NULL DEFAULT '[]'",
}


def _add_missing_columns(engine: Engine) -> None:
    inspector = inspect(engine)
    for (table, column), ddl in ADDED_COLUMNS.items():
        if column not in {c["name"] for c in inspector.get_columns(table)}:
            with engine.begin() as conn:
                conn.execute(sql_text(ddl))


_write_locks: dict[Engine, threading.Lock] = {}


@contextmanager
def _writing(engine: Engine) -> Iterator[Connection]:
    """One write transaction; on SQLite, one at a time in this process.

    SQLite has one writer at a time. Threads that meet its lock wait in its busy handler, which
    sleeps 1 ms, then 2, 5, 10 ... before looking again; queueing on a lock here instead hands
    the file over the moment it is free. Other processes still meet the busy handler.
    """
    lock = _write_locks.get(engine)
    if lock is None:
        with engine.begin() as conn:
            yield conn
        return
    with lock, engine.begin() as conn:
        yield conn


def is_transient(exc: BaseException) -> bool:
    # Lost connections, a database starting up, SQLite still busy after its busy_timeout; a value
    # refused (DataError, IntegrityError) is not: retrying cannot change the answer.
    return isinstance(exc, OperationalError | InterfaceError)


def retrying(budget_s: float, *, what: str) -> Retrying:
    """Call a database write again with backoff while the database is briefly away.

    ``retrying(300, what="store job 7")(complete_job, engine, 7, ...)``; the last error is
    raised once ``budget_s`` has passed.
    """

    def log_retry(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0] if exc else ""
        log.warning("database write failed (%s): %s; retrying", what, mask_url(reason))

    return Retrying(
        retry=retry_if_exception(is_transient),
        stop=stop_after_delay(budget_s),
        wait=wait_exponential_jitter(initial=0.2, max=10.0),
        before_sleep=log_retry,
        reraise=True,
    )


@dataclass
class Claim:
    """What a worker gets when it takes a job: the job to caption, or why it must not."""

    job: JobPublic | None
    reason: str = ""
    gave_up: bool = False
    # Marked to run alone (liveness): claim it again with ``alone=True`` once alone.
    run_alone: bool = False


def create_submission(session: Session, *, source: Sequence[str], options: str, model: str) -> Submission:
    submission = Submission(source=json.dumps(list(source)), options=options, model=model)
    session.add(submission)
    session.commit()
    session.refresh(submission)
    return submission


class ExistingJob(NamedTuple):
    id: int
    status: str
    path: str


def existing_jobs(session: Session, dedup_keys: Iterable[str]) -> dict[str, ExistingJob]:
    """dedup key → the job already in the database for it."""
    keys = list(dedup_keys)
    found: dict[str, ExistingJob] = {}
    for start in range(0, len(keys), 500):
        rows = session.exec(
            select(Job.dedup_key, Job.id, Job.status, Job.path).where(
                col(Job.dedup_key).in_(keys[start : start + 500])
            )
        )
        for key, job_id, status, path in rows:
            assert job_id is not None
            found[key] = ExistingJob(job_id, status, path)
    return found


def insert_jobs(session: Session, rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Insert job rows, skipping any whose dedup key exists (another submitter won the race).

    Returns dedup key → id for the rows this call inserted. The caller commits.
    """
    if not rows:
        return {}
    dialect = session.get_bind().dialect.name
    insert_fn = postgresql.insert if dialect == "postgresql" else sqlite.insert
    now = utcnow()
    values = [{"queued_at": now, **row} for row in rows]
    stmt = (
        insert_fn(Job)
        .on_conflict_do_nothing(index_elements=["dedup_key"])
        .returning(col(Job.id), col(Job.dedup_key))
    )
    result = session.execute(stmt, values)
    return {key: job_id for job_id, key in result}


def reset_jobs(session: Session, job_ids: Sequence[int], *, submission_id: int | None) -> None:
    """Put finished or failed jobs back to ``queued`` for ``--force``; the caller commits."""
    for start in range(0, len(job_ids), 500):
        session.execute(
            update(Job)
            .where(col(Job.id).in_(job_ids[start : start + 500]))
            .values(
                status=JobStatus.queued.value,
                attempts=0,
                error=None,
                caption=None,
                prompt_tokens=None,
                output_tokens=None,
                worker=None,
                claim_id=None,
                started_at=None,
                finished_at=None,
                queued_at=utcnow(),
                submission_id=submission_id,
            )
        )


def receive_job(engine: Engine, job_id: int, *, worker: str) -> None:
    """Note that this worker holds a queued job's message while it waits its turn to claim it.

    If the worker dies meanwhile, the message sits unacknowledged in Redis; this row is how a
    live worker knows to hand it out again (liveness.rescue_orphans).
    """
    with _writing(engine) as conn:
        conn.execute(
            update(Job)
            .where(col(Job.id) == job_id, col(Job.status) == JobStatus.queued.value)
            .values(worker=worker, started_at=utcnow())
        )


# This process's name for the claims of callers that name none (one process, one incarnation).
PROCESS_CLAIM_ID = uuid.uuid4().hex
_JOB_TABLE: Table = Job.__table__  # type: ignore[attr-defined]
_JOB_COLUMNS = tuple(_JOB_TABLE.c)
_CLAIM_VALUES: dict[str, Any] = {
    "status": JobStatus.running.value,
    "attempts": Job.attempts + 1,
    "started_at": bindparam("b_started", type_=_JOB_TABLE.c.started_at.type),
    "worker": bindparam("b_worker"),
    "claim_id": bindparam("b_claim"),
}
_CLAIM = {
    alone: update(Job)
    .where(
        col(Job.id) == bindparam("b_id"),
        col(Job.status) == JobStatus.queued.value,
        *(() if alone else (col(Job.isolation) == 0,)),
    )
    .values(**_CLAIM_VALUES, **({"isolation": 2} if alone else {}))
    .returning(*_JOB_COLUMNS)
    for alone in (False, True)
}
_JOB_ROW = select(*_JOB_COLUMNS).where(col(Job.id) == bindparam("b_id"))
_COMPLETE = (
    update(Job)
    # Two comparisons, not IN: an IN list is re-expanded into the SQL on every execution.
    .where(col(Job.id) == bindparam("b_id"), or_(*(col(Job.status) == status for status in ACTIVE)))
    .values(
        status=JobStatus.done.value,
        caption=bindparam("b_caption"),
        prompt_tokens=bindparam("b_prompt_tokens"),
        output_tokens=bindparam("b_output_tokens"),
        raw_caption=bindparam("b_raw_caption"),
        quality=bindparam("b_quality"),
        caption_attempts=bindparam("b_attempts"),
        quality_flags=bindparam("b_quality_flags"),
        error=None,
        finished_at=bindparam("b_finished", type_=_JOB_TABLE.c.finished_at.type),
    )
    .returning(col(Job.id))
)
_STORED_BY = select(col(Job.id)).where(
    col(Job.id) == bindparam("b_id"),
    col(Job.status) == JobStatus.done.value,
    col(Job.claim_id) == bindparam("b_claim"),
)
GAVE_UP = "gave up after"


def claim_job(
    engine: Engine,
    job_id: int,
    *,
    worker: str,
    max_attempts: int,
    alone: bool = False,
    claim_id: str | None = None,
) -> Claim:
    """Mark a job running and count the attempt; refuse jobs that are finished or out of attempts.

    A message can arrive again after its worker died (``task_reject_on_worker_lost``); counting
    attempts here, in the database, is what stops an image that kills its worker from looping.

    A job marked to run alone is claimed only with ``alone=True``; without, the answer says
    ``run_alone``, so a worker learns it from the claim and reads nothing before it.

    ``claim_id`` names this claim in the row (default: this process's one name). A call retried
    after its COMMIT landed but the acknowledgement was lost finds the job `running` under its
    own name and worker: that is its claim, taken once, counted once. A job running under any
    other name (a duplicate message, another worker, a dead incarnation) is refused.
    """
    claim_id = claim_id or PROCESS_CLAIM_ID
    params = {"b_id": job_id, "b_started": utcnow(), "b_worker": worker, "b_claim": claim_id}
    with _writing(engine) as conn:
        # Only a queued job: a job whose worker died is put back to queued first (liveness).
        row = conn.execute(_CLAIM[alone], params).first()
        if row is None:
            row = conn.execute(_JOB_ROW, params).first()
            if row is None:
                return Claim(None, "no such job")
            if row.status == JobStatus.queued.value and row.isolation and not alone:
                return Claim(None, "marked to run alone", run_alone=True)
            if row.claim_id != claim_id or row.worker != worker:
                return Claim(None, f"job is already {row.status}")
            if row.status == JobStatus.failed.value and (row.error or "").startswith(GAVE_UP):
                return Claim(None, row.error, gave_up=True)  # this claim's own verdict, below
            if row.status != JobStatus.running.value:
                return Claim(None, f"job is already {row.status}")
        if row.attempts > max_attempts:
            reason = (
                f"{GAVE_UP} {max_attempts} attempts: the worker died or timed out each time it "
                "captioned this image"
            )
            conn.execute(_fail_statement(job_id, reason))
            return Claim(None, reason, gave_up=True)
        return Claim(JobPublic.model_validate(row._asdict()))


@dataclass(frozen=True)
class Completion:
    """A caption to store, and the claim it was made under (see ``complete_jobs``)."""

    job_id: int
    caption: str
    prompt_tokens: int | None
    output_tokens: int | None
    claim_id: str | None = None
    # The quality guard's record (worker/quality_guard.py): the verdict on the kept attempt.
    raw_caption: str | None = None
    quality: str | None = None
    caption_attempts: int = 1
    quality_flags: str = "[]"


def complete_jobs(engine: Engine, completions: Sequence[Completion]) -> list[bool]:
    """Store captions in one transaction, each its own conditional UPDATE; True where stored.

    A job that already has a result keeps it. A job found done under the caption's own
    ``claim_id`` counts as stored: a retry whose first COMMIT landed. One value the database
    refuses rolls them all back; the caller then stores them one by one.
    """
    finished = utcnow()
    stored: list[bool] = []
    with _writing(engine) as conn:
        for item in completions:
            params = {
                "b_id": item.job_id,
                "b_caption": item.caption,
                "b_prompt_tokens": item.prompt_tokens,
                "b_output_tokens": item.output_tokens,
                "b_finished": finished,
                "b_claim": item.claim_id,
                "b_raw_caption": item.raw_caption,
                "b_quality": item.quality,
                "b_attempts": item.caption_attempts,
                "b_quality_flags": item.quality_flags,
            }
            done = conn.execute(_COMPLETE, params).first() is not None
            if not done and item.claim_id is not None:
                done = conn.execute(_STORED_BY, params).first() is not None
            stored.append(done)
    return stored


def complete_job(
    engine: Engine,
    job_id: int,
    *,
    caption: str,
    prompt_tokens: int | None,
    output_tokens: int | None,
    claim_id: str | None = None,
) -> bool:
    """Store the caption unless the job already has one; True when this call stored it."""
    return complete_jobs(engine, [Completion(job_id, caption, prompt_tokens, output_tokens, claim_id)])[0]


def _fail_statement(job_id: int, reason: str) -> Any:
    return (
        update(Job)
        .where(col(Job.id) == job_id, col(Job.status).in_(ACTIVE))
        .values(status=JobStatus.failed.value, error=reason[:2000], finished_at=utcnow())
    )


def fail_job(engine: Engine, job_id: int, reason: str) -> bool:
    """Record a failure with its reason; a job that is already done keeps its caption."""
    with _writing(engine) as conn:
        return bool(conn.execute(_fail_statement(job_id, reason)).rowcount)


def return_to_queue(
    engine: Engine,
    job_id: int,
    *,
    status: str,
    worker: str,
    started_at: datetime | None = None,
    **values: Any,
) -> bool:
    """Put a job back to `queued`, if it is still as it was seen: its worker stopped or died.

    Conditional on status, worker and (when given) start time, so a job finished or taken
    elsewhere is left alone and, of several processes acting on one snapshot, one succeeds.
    ``values`` adds columns to set: an attempt given back (``give_back_attempt()``), isolation.
    """
    conditions = [col(Job.id) == job_id, col(Job.status) == status, col(Job.worker) == worker]
    if started_at is not None:
        conditions.append(col(Job.started_at) == started_at)
    with _writing(engine) as conn:
        result = conn.execute(
            update(Job)
            .where(*conditions)
            .values(status=JobStatus.queued.value, worker=None, started_at=None, claim_id=None, **values)
        )
        return bool(result.rowcount)


def give_back_attempt() -> Any:
    """The SQL for one attempt fewer (an attempt the job did not cause)."""
    return case((col(Job.attempts) > 0, Job.attempts - 1), else_=0)


def set_job_path(session: Session, job_id: int, path: str) -> None:
    """Record where a job's image went (moved to done/ or failed/); the caller commits."""
    session.execute(update(Job).where(col(Job.id) == job_id).values(path=path))


def status_counts(session: Session, *, submission_id: int | None = None) -> dict[str, int]:
    query = select(Job.status, func.count()).group_by(Job.status)
    if submission_id is not None:
        query = query.where(Job.submission_id == submission_id)
    counts = {status.value: 0 for status in JobStatus}
    for status, count in session.exec(query):
        counts[status] = count
    return counts


def rate_per_minute(session: Session, *, window: timedelta, submission_id: int | None = None) -> float:
    """Images finished per minute, over the last ``window`` or since the first of them started.

    Measuring from the earliest start keeps a short run (a demo, the first minutes of a big
    one) from reading as slow just because the window is mostly empty.
    """
    now = utcnow()
    query = (
        select(func.count(), func.min(Job.started_at))
        .select_from(Job)
        .where(col(Job.finished_at) >= now - window, col(Job.status) == JobStatus.done.value)
    )
    if submission_id is not None:
        query = query.where(Job.submission_id == submission_id)
    done, first_start = session.exec(query).one()
    if not done:
        return 0.0
    if first_start is not None and first_start.tzinfo is None:
        first_start = first_start.replace(tzinfo=now.tzinfo)
    start = max(first_start or now - window, now - window)
    seconds = max((now - start).total_seconds(), 1.0)
    return float(done) / seconds * 60.0


def list_jobs(
    session: Session,
    *,
    states: Sequence[str] = (),
    submission_id: int | None = None,
    path_pattern: str | None = None,
    search: str | None = None,
    limit: int | None = None,
) -> list[JobPublic]:
    query = select(Job).order_by(col(Job.id))
    submissions = [submission_id] if submission_id is not None else []
    for condition in job_conditions(
        session, states=states, submission_ids=submissions, path_pattern=path_pattern, search=search
    ):
        query = query.where(condition)
    if limit is not None:
        query = query.limit(limit)
    return [JobPublic.model_validate(job) for job in session.exec(query)]


def latest_submission_id(session: Session) -> int | None:
    return session.exec(select(func.max(Submission.id))).one()


def active_watchers(session: Session, *, stale_after: timedelta) -> list[Watcher]:
    query = select(Watcher).where(fresh(Watcher, stale_after)).order_by(col(Watcher.inbox))
    return list(session.exec(query))


def active_endpoints(session: Session, *, kind: str, stale_after: timedelta) -> list[Endpoint]:
    query = select(Endpoint).where(Endpoint.kind == kind, fresh(Endpoint, stale_after))
    return list(session.exec(query.order_by(col(Endpoint.id))))


def job_conditions(
    session: Session,
    *,
    states: Sequence[str] = (),
    submission_ids: Sequence[int] = (),
    path_pattern: str | None = None,
    search: str | None = None,
) -> list[WhereClause]:
    """WHERE clauses on `job` for the filters the CLI offers (results, export, retry, cancel)."""
    conditions: list[WhereClause] = []
    if states:
        conditions.append(col(Job.status).in_(list(states)))
    if submission_ids:
        conditions.append(col(Job.submission_id).in_(list(submission_ids)))
    if path_pattern:
        like = path_pattern.replace("%", r"\%").replace("_", r"\_").replace("*", "%").replace("?", "_")
        conditions.append(or_(col(Job.path).like(like, escape="\\"), col(Job.path) == path_pattern))
    if search:
        conditions.append(caption_matches(session, search))
    return conditions


def models_of(engine: Engine, job_ids: Sequence[int]) -> list[tuple[int, str]]:
    """(job id, model key) for each job: a message sent again goes to its model's queue."""
    pairs: list[tuple[int, str]] = []
    with Session(engine) as session:
        for start in range(0, len(job_ids), 500):
            chunk = list(job_ids[start : start + 500])
            rows = session.exec(
                select(Job.id, Job.model, Job.quantize, Job.adapter_hash).where(col(Job.id).in_(chunk))
            )
            for job_id, model, quantize, adapter_hash in rows:
                if job_id is not None:
                    pairs.append((job_id, spec_key(model, quantize, adapter_hash)))
    return pairs
