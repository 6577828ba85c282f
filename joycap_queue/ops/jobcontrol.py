"""`retry`, `cancel` and `forget`: changing jobs that are already in the database.

Each change is a conditional UPDATE or DELETE, committed before Redis is touched, so the database
stays the source of truth. A cancelled job is a row with status `cancelled`: `claim_job` claims
only queued or running jobs, so a worker that still gets its message skips it. Its messages are
also taken out of the Redis queue, and those a worker has already taken are revoked by task id;
that saves the workers the skipping, but correctness never depends on it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import RedisError
from sqlalchemy import delete, func, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from joycap_queue.captions import prompts
from joycap_queue.captions.modelspec import ModelSpec, spec_key
from joycap_queue.captions.quality import CleanupRules
from joycap_queue.captions.request import (
    CaptionRequest,
    dedup_key,
    generation_params,
    profile_of,
    request_columns,
)
from joycap_queue.config import Settings
from joycap_queue.errors import JoycapError, OptionError
from joycap_queue.messaging.app import make_celery, send_by_model
from joycap_queue.messaging.broker import held_messages, waiting_messages
from joycap_queue.results.export import quality_condition
from joycap_queue.store import engines, jobstate, queries
from joycap_queue.store.models import DatasetRow, Job, JobStatus, Submission, Watcher, utcnow
from joycap_queue.store.search import WhereClause

RETRY_BATCH = 500
REQUEUED = {
    "status": JobStatus.queued.value,
    "attempts": 0,
    "error": None,
    "caption": None,
    # The quality guard's record is of the caption being replaced; a fresh start starts it over.
    "raw_caption": None,
    "quality": None,
    "caption_attempts": 0,
    "quality_flags": "[]",
    "prompt_tokens": None,
    "output_tokens": None,
    "worker": None,
    "started_at": None,
    "finished_at": None,
    # A run-alone mark (worker/gate.py) blames the crashes of earlier attempts; a retry is a new
    # start, and a job kept alone would run one at a time and be blamed for any death meanwhile.
    "isolation": 0,
}
# A retry rebuilds the job's request from its columns with the changes laid over them; where its
# images go (sidecars, moves) and how its caption is cleaned up are the job's own and stay.
KEPT_ON_RETRY = ("outputs", "cleanup")


@dataclass(frozen=True)
class JobSelection:
    """Which jobs a command acts on: submissions, a path glob and/or the captions' quality."""

    submission_ids: tuple[int, ...] = ()
    path_pattern: str | None = None
    quality: str | None = None  # exporting.QUALITY_CHOICES: only done jobs have one

    def conditions(self, session: Session, states: Sequence[str]) -> list[WhereClause]:
        conditions = queries.job_conditions(
            session, states=states, submission_ids=self.submission_ids, path_pattern=self.path_pattern
        )
        if self.quality is not None:
            conditions.append(quality_condition(self.quality))
        return conditions


# --- messages in Redis -----------------------------------------------------------------------


def revoke_messages(app: Celery, queue: str, job_ids: Iterable[int]) -> tuple[int, int]:
    """Take these jobs' messages out of the queue; revoke those a worker holds. (removed, revoked)."""
    wanted = set(job_ids)
    if not wanted:
        return 0, 0
    removed = 0
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        matches: dict[bytes, list[bytes]] = {}
        for key, message in waiting_messages(channel, queue):
            if message.job_id in wanted:
                matches.setdefault(key, []).append(message.raw)
        if matches:
            # A message a worker takes meanwhile reaches it anyway, and the worker skips the job.
            pipe = channel.client.pipeline(transaction=False)
            for key, raws in matches.items():
                for raw in raws:
                    pipe.lrem(key, 1, raw)
            removed = sum(pipe.execute())
        held = [m.task_id for m in held_messages(channel, queue) if m.job_id in wanted and m.task_id]
    if held:
        app.control.revoke(held)
    return removed, len(held)


def revoke_quietly(settings: Settings, job_ids: Sequence[int]) -> tuple[int, int] | None:
    """`revoke_messages`, or None when Redis cannot be reached (workers still skip the jobs)."""
    if not job_ids:
        return 0, 0
    try:
        return revoke_messages(make_celery(settings), settings.queue, job_ids)
    except (KombuOperationalError, OSError, RedisError):
        return None


# --- cancel ----------------------------------------------------------------------------------


@dataclass
class CancelSummary:
    cancelled: int = 0
    running: int = 0
    removed: int | None = 0  # None: Redis was unreachable
    revoked: int = 0


def cancel_jobs(settings: Settings, selection: JobSelection) -> CancelSummary:
    """Cancel the selected queued jobs; running ones finish (they are counted)."""
    engine = engines.get_engine(settings.effective_database_url)
    summary = CancelSummary()
    with Session(engine) as session:
        statement = (
            update(Job)
            .where(*selection.conditions(session, [JobStatus.queued.value]))
            .values(status=JobStatus.cancelled.value, error="cancelled", finished_at=utcnow())
            .returning(col(Job.id))
        )
        ids = [int(job_id) for job_id in session.execute(statement).scalars()]
        session.commit()
        running = selection.conditions(session, [JobStatus.running.value])
        summary.running = int(
            session.execute(select(func.count()).select_from(Job).where(*running)).scalar_one()
        )
    summary.cancelled = len(ids)
    revoked = revoke_quietly(settings, ids)
    summary.removed, summary.revoked = revoked if revoked is not None else (None, 0)
    return summary


# --- retry -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestChanges:
    """Caption options given to `retry`: each replaces the job's own; None keeps it."""

    caption_type: str | None = None
    length: str | None = None
    extra: tuple[str, ...] | None = None
    name: str | None = None
    custom_prompt: str | None = None
    prompt_file: tuple[prompts.WeightedPrompt, ...] = ()
    prepend: str | None = None
    append: str | None = None
    model: str | None = None
    profile: str | None = None
    generation: dict[str, Any] = field(default_factory=dict)
    quantize: str | None = None
    # (folder, hash) of --lora, checked and hashed; ("", "") for --lora '' (no adapter).
    adapter: tuple[str, str] | None = None

    @property
    def empty(self) -> bool:
        return self == RequestChanges()


@dataclass
class RetrySummary:
    queued: int = 0
    # (job id, the job that already has the new request, its status): left as they were.
    conflicts: list[tuple[int, int, str]] = field(default_factory=list)


def _options(job: Any, changes: RequestChanges, profile: str) -> prompts.CaptionOptions:
    custom_before = job.caption_type is None
    if changes.custom_prompt:
        return prompts.CaptionOptions(custom_prompt=changes.custom_prompt)
    if changes.prompt_file:
        return prompts.CaptionOptions()
    wording = (changes.caption_type, changes.length, changes.extra, changes.name)
    if custom_before and all(value is None for value in wording):
        return prompts.CaptionOptions(custom_prompt=job.prompt)
    extra: Iterable[str | int] = (
        changes.extra if changes.extra is not None else json.loads(job.extra_options or "[]")
    )
    options = prompts.CaptionOptions(
        caption_type=prompts.resolve_caption_type(
            profile, changes.caption_type or job.caption_type or prompts.DEFAULT_CAPTION_TYPE
        ),
        length=prompts.resolve_length(changes.length or job.caption_length or prompts.DEFAULT_LENGTH),
        extra=prompts.resolve_extra(profile, extra),
        name=changes.name if changes.name is not None else job.name,
    )
    prompts.build_prompt(profile, options)  # the name option without a name fails here, not in a worker
    return options


def changed_columns(job: Any, changes: RequestChanges, settings: Settings) -> dict[str, Any]:
    """The job's request columns and dedup key after the changes (as intake would have built them)."""
    model = changes.model or job.model
    adapter, adapter_hash = (
        changes.adapter if changes.adapter is not None else (job.adapter, job.adapter_hash)
    )
    spec = ModelSpec(model, changes.quantize or job.quantize, adapter, adapter_hash)
    if changes.profile:
        profile = changes.profile
    elif changes.model:
        profile = profile_of(settings.model_copy(update={"model": model, "profile": ""}))
    else:
        profile = job.profile
    options = _options(job, changes, profile)
    params = json.loads(job.gen_params or "{}")
    if changes.generation:
        merged = {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k}
        params = generation_params(settings.model_copy(update={**merged, **params, **changes.generation}))
    request = CaptionRequest(
        profile=profile,
        model=model,
        options=options,
        prompt_file=changes.prompt_file,
        gen_params=params,
        prepend=job.prepend if changes.prepend is None else changes.prepend,
        append=job.append if changes.append is None else changes.append,
        quantize=spec.quantize,
        adapter=spec.adapter,
        adapter_hash=spec.adapter_hash,
        cleanup=CleanupRules.from_json(job.cleanup),
    )
    prompt = request.prompt_for(job.content_hash)
    columns = {name: value for name, value in request_columns(request).items() if name not in KEPT_ON_RETRY}
    return {**columns, "prompt": prompt, "dedup_key": dedup_key(job.content_hash, prompt, request)}


def retry_jobs(
    settings: Settings,
    selection: JobSelection,
    *,
    states: Sequence[str] = (JobStatus.failed.value,),
    changes: RequestChanges | None = None,
) -> RetrySummary:
    """Queue the selected failed (or cancelled) jobs again, in their own rows, and send them.

    With a quality in the selection it takes done jobs instead: captions the guard flagged are
    captioned again, the row starting over as a fresh job. With changes, each job's request is rebuilt from its own options with the changes laid over
    them: a new prompt, model or generation setting is a new dedup key. A job whose new request
    already has a job of its own is left as it is and reported.
    """
    if selection.quality is not None:
        # A good caption is never thrown away by accident: done jobs only with a flag asked for.
        if selection.quality == "ok":
            raise OptionError("quality", "retry --quality takes flagged captions: flagged or a flag")
        if set(states) != {JobStatus.done.value}:
            raise OptionError("state", "retry --quality takes done jobs only; leave out --state")
    elif set(states) - {JobStatus.failed.value, JobStatus.cancelled.value}:
        raise OptionError("state", "retry takes failed or cancelled jobs (done ones with --quality)")
    app = make_celery(settings)
    engine = engines.get_engine(settings.effective_database_url)
    summary = RetrySummary()
    with Session(engine) as session:
        if changes is None or changes.empty:
            statement = (
                update(Job)
                .where(*selection.conditions(session, states))
                .values(**REQUEUED, queued_at=utcnow())
                .returning(col(Job.id), col(Job.model), col(Job.quantize), col(Job.adapter_hash))
            )
            routed = [(int(row[0]), spec_key(*row[1:])) for row in session.execute(statement)]
            session.commit()
            summary.queued = send_by_model(app, routed, queue=settings.queue)
            return summary
        last_id = 0
        claimed: dict[str, int] = {}
        while True:
            batch = session.exec(
                select(Job)
                .where(*selection.conditions(session, states), col(Job.id) > last_id)
                .order_by(col(Job.id))
                .limit(RETRY_BATCH)
            ).all()
            if not batch:
                return summary
            last_id = batch[-1].id or last_id
            new = {job.id: changed_columns(job, changes, settings) for job in batch}
            owners = jobstate.existing_jobs(session, [values["dedup_key"] for values in new.values()])
            ids: list[tuple[int, str]] = []
            for job in batch:
                assert job.id is not None
                key = new[job.id]["dedup_key"]
                owner = owners.get(key)
                other = owner.id if owner is not None and owner.id != job.id else claimed.get(key)
                if other is not None and other != job.id:
                    status = owner.status if owner is not None else JobStatus.queued.value
                    summary.conflicts.append((job.id, other, status))
                    continue
                claimed[key] = job.id
                session.execute(
                    update(Job)
                    .where(col(Job.id) == job.id, col(Job.status).in_(list(states)))
                    .values(**new[job.id], **REQUEUED, queued_at=utcnow())
                )
                values = new[job.id]
                ids.append((job.id, spec_key(values["model"], values["quantize"], values["adapter_hash"])))
            try:
                session.commit()
            except IntegrityError:
                session.rollback()
                raise JoycapError(
                    "another submit queued the same images meanwhile; run retry again"
                ) from None
            session.expunge_all()
            summary.queued += send_by_model(app, ids, queue=settings.queue)


# --- forget ----------------------------------------------------------------------------------


@dataclass
class ForgetSummary:
    jobs: int = 0
    dataset_rows: int = 0
    removed: int | None = 0


def submission_counts(settings: Settings, submission_id: int) -> dict[str, int]:
    """Job counts by state of a submission; JoycapError if there is no such submission."""
    engine = engines.get_engine(settings.effective_database_url)
    with Session(engine) as session:
        if session.get(Submission, submission_id) is None:
            raise JoycapError(f"no submission {submission_id} (see `joycap-queue status`)")
        return queries.status_counts(session, submission_id=submission_id)


def forget_submission(settings: Settings, submission_id: int) -> ForgetSummary:
    """Delete a submission's jobs, their dataset rows and, unless a watcher still uses it, the submission."""
    engine = engines.get_engine(settings.effective_database_url)
    summary = ForgetSummary()
    with Session(engine) as session:
        jobs = select(Job.id).where(Job.submission_id == submission_id)
        queued = [
            i for i in session.exec(jobs.where(Job.status == JobStatus.queued.value)).all() if i is not None
        ]
        rows = session.execute(delete(DatasetRow).where(col(DatasetRow.job_id).in_(jobs)))
        summary.dataset_rows = int(rows.rowcount)  # type: ignore[attr-defined]
        deleted = session.execute(delete(Job).where(col(Job.submission_id) == submission_id))
        summary.jobs = int(deleted.rowcount)  # type: ignore[attr-defined]
        watched = session.exec(select(Watcher.id).where(Watcher.submission_id == submission_id)).first()
        if watched is None:
            session.execute(delete(Submission).where(col(Submission.id) == submission_id))
        session.commit()
    revoked = revoke_quietly(settings, queued)
    summary.removed = revoked[0] if revoked is not None else None
    return summary
