"""The job state machine: every change of a job is one conditional UPDATE, so a redelivered message,
a second worker holding the same job or a retried write can never give a job two captions or undo a result."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import Table, bindparam, case, or_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from joycap_queue.store.engines import writing
from joycap_queue.store.models import Job, JobPublic, JobStatus, Submission, utcnow

log = logging.getLogger(__name__)
ACTIVE = (JobStatus.queued.value, JobStatus.running.value)


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
    with writing(engine) as conn:
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
    with writing(engine) as conn:
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
    with writing(engine) as conn:
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
    with writing(engine) as conn:
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
    with writing(engine) as conn:
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
