"""The database tables: one submission row per `submit`, one job row per image and request.

The database, not Redis, is the source of truth: a job row exists (status ``queued``) before its
message is sent, and its status, attempts and error say everything that happened to it.
"""

from __future__ import annotations

import enum
import json
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Column, Index, Integer, Text, UniqueConstraint
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class JobStatus(str, enum.Enum):
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"
    # Taken off the queue by `cancel`: claim_job claims only queued jobs (or its own claim again),
    # so a worker that still receives the message skips it; submitting the image again queues it.
    cancelled = "cancelled"


class SubmissionBase(SQLModel):
    source: str = Field(sa_column=Column(Text, nullable=False), description="what was submitted (JSON list)")
    options: str = Field(sa_column=Column(Text, nullable=False), description="caption options (JSON)")
    model: str
    total: int = 0
    queued: int = 0
    already_done: int = 0
    already_queued: int = 0
    skipped: int = 0
    rejected: int = 0


class Submission(SubmissionBase, table=True):
    id: int | None = Field(default=None, primary_key=True)
    created_at: datetime = Field(default_factory=utcnow)


class JobBase(SQLModel):
    path: str = Field(sa_column=Column(Text, nullable=False))
    content_hash: str = Field(max_length=64, index=True)
    size_bytes: int = 0
    width: int | None = None
    height: int | None = None

    profile: str = Field(max_length=16)
    caption_type: str | None = Field(default=None, max_length=64)
    caption_length: str | None = Field(default=None, max_length=16)
    extra_options: str = Field(default="[]", sa_column=Column(Text, nullable=False, default="[]"))
    name: str | None = Field(default=None, sa_column=Column(Text))
    prompt: str = Field(sa_column=Column(Text, nullable=False))
    model: str = Field(sa_column=Column(Text, nullable=False))
    # none, 8bit or nf4, and the LoRA adapter (folder, hash of its files): with the model, what a
    # worker must load to take the job (modelspec.ModelSpec).
    quantize: str = Field(
        default="none", sa_column=Column(Text, nullable=False, default="none", server_default="none")
    )
    adapter: str = Field(default="", sa_column=Column(Text, nullable=False, default="", server_default=""))
    adapter_hash: str = Field(
        default="", sa_column=Column(Text, nullable=False, default="", server_default="")
    )
    gen_params: str = Field(default="{}", sa_column=Column(Text, nullable=False, default="{}"))
    prepend: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    append: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    # Clean-up rules the user opted into (quality.CleanupRules as JSON), applied when the caption
    # is stored; "{}" for none. Part of the dedup key when set, like prepend and append.
    cleanup: str = Field(
        default="{}", sa_column=Column(Text, nullable=False, default="{}", server_default="{}")
    )
    # What to write beside the image when the job ends (sidecars, moving); not part of the
    # dedup key, since it does not change the caption. JSON of sidecars.OutputOptions.
    outputs: str = Field(default="{}", sa_column=Column(Text, nullable=False, default="{}"))

    status: str = Field(default=JobStatus.queued.value, max_length=16, index=True)
    attempts: int = 0
    error: str | None = Field(default=None, sa_column=Column(Text))
    caption: str | None = Field(default=None, sa_column=Column(Text))
    # The caption before the clean-up rules (None when no rule is set): `export --raw`.
    raw_caption: str | None = Field(default=None, sa_column=Column(Text))
    # The quality guard's verdict on the kept caption: "ok", or its flags joined by "," worst
    # first (quality.FLAGS); None for captions stored before the guard existed.
    quality: str | None = Field(default=None, sa_column=Column(Text))
    caption_attempts: int = Field(
        default=0, sa_column=Column(Integer, nullable=False, default=0, server_default="0")
    )
    # Each attempt's flags, as a JSON list of lists: [["truncated"], []] kept the second.
    quality_flags: str = Field(
        default="[]", sa_column=Column(Text, nullable=False, default="[]", server_default="[]")
    )
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    worker: str | None = Field(default=None, max_length=255)

    queued_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = Field(default=None, index=True)


class Job(JobBase, table=True):
    __table_args__ = (Index("ix_job_submission_status", "submission_id", "status"),)

    id: int | None = Field(default=None, primary_key=True)
    submission_id: int | None = Field(default=None, foreign_key="submission.id", index=True)
    # content hash + final prompt + model + generation parameters: one caption per request.
    dedup_key: str = Field(max_length=64, unique=True)
    # After a worker died with it in flight among others: 1, run it alone; 2, running alone now
    # (so a death then is its fault). See liveness.py and worker/gate.py.
    isolation: int = Field(default=0, sa_column=Column(Integer, nullable=False, server_default="0"))
    # Names the claim that made the job `running` (jobstate.claim_job): a claim retried after its
    # COMMIT's acknowledgement was lost finds its own name here and knows the job is its own.
    claim_id: str | None = Field(default=None, max_length=64)


class Watcher(SQLModel, table=True):
    """One row per watched inbox: the lock that keeps a second watcher off it, and its counters."""

    id: int | None = Field(default=None, primary_key=True)
    inbox: str = Field(sa_column=Column(Text, nullable=False, unique=True))
    host: str = Field(max_length=255)
    pid: int
    # The holder's token (leases.py): a write by a holder whose lock was taken over changes nothing.
    owner: str | None = Field(default=None, max_length=64)
    started_at: datetime = Field(default_factory=utcnow)
    heartbeat_at: datetime = Field(default_factory=utcnow)
    submission_id: int | None = Field(default=None, foreign_key="submission.id")
    seen: int = 0
    queued: int = 0
    waiting: int = 0


class Endpoint(SQLModel, table=True):
    """A running service others should know of (Flower's URL), kept fresh by a heartbeat."""

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=32, index=True)
    url: str = Field(sa_column=Column(Text, nullable=False))
    host: str = Field(max_length=255)
    pid: int
    owner: str | None = Field(default=None, max_length=64)  # as Watcher.owner
    # A worker's model state, written with each beat: "loaded", "loading", "idle-unloaded".
    state: str | None = Field(default=None, sa_column=Column(Text))
    started_at: datetime = Field(default_factory=utcnow)
    heartbeat_at: datetime = Field(default_factory=utcnow)


class DatasetRow(SQLModel, table=True):
    """One row of a submitted dataset and the job that captions it.

    Export writes captions back onto the dataset in its own row order through this table, and a
    second `submit-dataset` knows which rows already have a caption. A row has one entry per
    request it was captioned with (another prompt or model is another job).
    """

    __tablename__ = "dataset_row"
    __table_args__ = (UniqueConstraint("dataset", "split", "row_index", "job_id"),)

    id: int | None = Field(default=None, primary_key=True)
    # The source as `submit-dataset` resolved it: an absolute path, or "hub:" and the hub name.
    dataset: str = Field(sa_column=Column(Text, nullable=False))
    split: str = Field(max_length=255)
    row_index: int
    # The id column's value (im_name), and the name column's value that filled {name}, if any.
    row_key: str | None = Field(default=None, sa_column=Column(Text))
    name: str | None = Field(default=None, sa_column=Column(Text))
    content_hash: str = Field(max_length=64)
    job_id: int = Field(foreign_key="job.id", index=True)


class JobPublic(JobBase):
    """A job as the CLI shows and exports it."""

    id: int
    submission_id: int | None
    dedup_key: str

    def extra_option_list(self) -> list[int]:
        return list(json.loads(self.extra_options or "[]"))

    def to_record(self) -> dict[str, Any]:
        record = self.model_dump(mode="json")
        record["extra_options"] = self.extra_option_list()
        record["gen_params"] = json.loads(self.gen_params or "{}")
        return record
