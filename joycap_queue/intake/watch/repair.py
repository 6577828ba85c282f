"""Sidecars a watched inbox's done jobs lack: copies of a captioned image, and jobs whose worker
died between storing the caption and writing its files."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from joycap_queue.intake.watch.inbox import InboxState
from joycap_queue.results.sidecars import finish_job_outputs, has_sidecar, sidecar_record, write_sidecars
from joycap_queue.store.models import Job, JobPublic, JobStatus, utcnow


def finish_twins(engine: Engine, state: InboxState) -> None:
    """Copies of an image captioned (or queued) under another path get the same sidecars."""
    if not state.twins:
        return
    with Session(engine) as session:
        jobs = session.exec(select(Job).where(col(Job.id).in_(list(state.twins.values())))).all()
    by_id = {job.id: job for job in jobs}
    for twin, job_id in list(state.twins.items()):
        job = by_id.get(job_id)
        if job is None or job.status == JobStatus.failed.value:
            del state.twins[twin]
        elif job.status == JobStatus.done.value and job.caption is not None:
            if twin.exists():
                record = {**sidecar_record(JobPublic.model_validate(job)), "image": twin.name}
                write_sidecars(twin, state.outputs, caption=job.caption, record=record)
            del state.twins[twin]


def reconcile(engine: Engine, state: InboxState, *, grace_s: float) -> None:
    """Give done jobs of this inbox the sidecars they lack (a worker died after storing)."""
    finish_twins(engine, state)
    outputs = state.outputs
    if not (outputs.txt or outputs.json):
        return
    # The worker writes a job's sidecars right after storing it; only a job done for longer
    # than the grace is one whose worker died in between. A younger one may be in the middle
    # of its move, and two finishers of one image race each other.
    cutoff = utcnow() - timedelta(seconds=grace_s)
    with Session(engine) as session:
        jobs = session.exec(
            select(Job.id, Job.path).where(
                col(Job.path).startswith(str(state.root) + os.sep),
                Job.status == JobStatus.done.value,
                col(Job.finished_at) < cutoff,
            )
        ).all()
    for job_id, path in jobs:
        image = Path(path)
        if not image.exists() or not state.is_candidate(image):
            continue
        missing = (outputs.txt and not has_sidecar(image, ".txt")) or (
            outputs.json and not has_sidecar(image, ".json")
        )
        if missing:
            assert job_id is not None
            finish_job_outputs(engine, job_id)
