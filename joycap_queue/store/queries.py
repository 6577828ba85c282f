"""Read-only questions about jobs: counts, rates, lists, the conditions of a set of jobs."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import func, or_
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from joycap_queue.captions.modelspec import spec_key
from joycap_queue.store.leases import fresh
from joycap_queue.store.models import Endpoint, Job, JobPublic, JobStatus, Submission, Watcher, utcnow
from joycap_queue.store.search import WhereClause, caption_matches

log = logging.getLogger(__name__)


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
