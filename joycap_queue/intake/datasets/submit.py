"""`submit_dataset`: the rows of a Hugging Face dataset become jobs, through `enqueue_images`.

Per batch of rows: each image is written once to the content-addressed image store (so workers on
other machines can read it), the rows whose request already has a caption are counted and left
alone, the rest go through `intake.enqueue_images` like any submitted file, one request per
distinct name, and every row is recorded in `dataset_row` with its job, so export can put the
captions back in the dataset's order.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import delete
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col, select

from joycap_queue.captions.prompts import build_prompt
from joycap_queue.captions.request import CaptionRequest, RequestOptions, build_requests, dedup_key
from joycap_queue.config import Settings
from joycap_queue.intake.datasets.source import (
    DatasetSource,
    SourceRow,
    choose_columns,
    iter_rows,
    load_split,
)
from joycap_queue.intake.enqueue import enqueue_images
from joycap_queue.intake.images import ImageError
from joycap_queue.intake.imagestore import StoredImage, store_image, store_root
from joycap_queue.messaging.app import make_celery, ping_broker
from joycap_queue.store import engines, jobstate
from joycap_queue.store.models import DatasetRow, JobStatus, Submission

BATCH_ROWS = 500
NAME_OPTION = 0  # the extra option that names the person: prompts.EXTRA_OPTION_KEYS[0]


@dataclass
class DatasetSummary:
    submission_id: int | None = None
    split: str = ""
    rows: int = 0
    queued: int = 0
    already_captioned: int = 0
    already_queued: int = 0
    rejected: int = 0
    rejections: list[tuple[str, str]] = field(default_factory=list)


class NameRequests:
    """The CaptionRequests (one per prompt) for each distinct name: the name is part of the
    prompt, so of the dedup key.

    With a name column, the name extra option is added to the caption options when missing (that
    is what the column is for), and a custom prompt's ``{name}`` is replaced. Rows without a name
    use the requests as given.
    """

    def __init__(self, settings: Settings, options: RequestOptions, *, by_name: bool) -> None:
        self.by_name = by_name
        self.base = build_requests(settings, options)
        self._named: dict[str, list[CaptionRequest]] = {}
        if by_name:
            self.for_name("Name")  # checks the options with a name before anything is written

    def for_name(self, name: str | None) -> list[CaptionRequest]:
        if not self.by_name or not name:
            return self.base
        requests = self._named.get(name)
        if requests is None:
            requests = self._named[name] = [_named(request, name) for request in self.base]
            for request in requests:
                if not request.prompt_file:
                    build_prompt(request.profile, request.options)
        return requests


def _named(request: CaptionRequest, name: str) -> CaptionRequest:
    options = request.options
    extra = options.extra if NAME_OPTION in options.extra else (NAME_OPTION, *options.extra)
    custom = options.custom_prompt
    return dataclasses.replace(
        request,
        options=dataclasses.replace(
            options,
            name=name,
            extra=extra,
            custom_prompt=custom.replace("{name}", name) if custom else custom,
        ),
    )


@dataclass
class _Planned:
    row: SourceRow
    stored: StoredImage
    key: str
    slot: int  # which of the requests (prompts): their jobs are created in this order, per row


def submit_dataset(
    source: DatasetSource,
    settings: Settings,
    options: RequestOptions,
    *,
    split: str | None = None,
    image_column: str | None = None,
    id_column: str | None = None,
    name_column: str | None = None,
    force: bool = False,
    on_start: Callable[[int], None] | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> DatasetSummary:
    """Queue a caption job for every row of a dataset split that has no caption for this request yet."""
    app = make_celery(settings)
    ping_broker(app)
    split_name, dataset = load_split(source, split)
    columns = choose_columns(dataset, image_column=image_column, id_column=id_column, name_column=name_column)
    requests = NameRequests(settings, options, by_name=name_column is not None)
    engine = engines.get_engine(settings.effective_database_url)
    root = store_root(settings)
    summary = DatasetSummary(split=split_name)
    with Session(engine) as session:
        submission = jobstate.create_submission(
            session,
            source=[f"{source.key}#{split_name}"],
            options=json.dumps(requests.base[0].describe(), sort_keys=True),
            model=requests.base[0].model,
        )
        summary.submission_id = submission.id
    if on_start is not None:
        on_start(len(dataset))
    batches = iter_rows(dataset, columns, base_dir=source.base_dir, batch_size=BATCH_ROWS)
    for batch in batches:
        _submit_batch(batch, source, split_name, requests, settings, root, summary, force=force, app=app)
        if on_rows is not None:
            on_rows(len(batch))
    with Session(engine) as session:
        row = session.get(Submission, summary.submission_id)
        if row is not None:
            row.sqlmodel_update(
                {
                    "total": summary.rows,
                    "queued": summary.queued,
                    "already_done": summary.already_captioned,
                    "already_queued": summary.already_queued,
                    "rejected": summary.rejected,
                }
            )
            session.add(row)
            session.commit()
    return summary


def _submit_batch(
    batch: list[SourceRow],
    source: DatasetSource,
    split: str,
    requests: NameRequests,
    settings: Settings,
    root: Path,
    summary: DatasetSummary,
    *,
    force: bool,
    app: Any,
) -> None:
    summary.rows += len(batch)
    planned: list[_Planned] = []
    current_hash: dict[int, str | None] = {}
    for row in batch:
        try:
            stored = store_image(root, row.image_bytes())
        except ImageError as exc:
            summary.rejected += 1
            summary.rejections.append((row.label, str(exc)))
            current_hash[row.index] = None
            continue
        current_hash[row.index] = stored.content_hash
        for slot, request in enumerate(requests.for_name(row.name)):
            key = dedup_key(stored.content_hash, request.prompt_for(stored.content_hash), request)
            planned.append(_Planned(row, stored, key, slot))
    engine = engines.get_engine(settings.effective_database_url)
    with Session(engine) as session:
        before = jobstate.existing_jobs(session, [item.key for item in planned])
    # Rows whose request has a caption are left alone: that is what makes a second submit resume.
    # By name and prompt; a name's first prompt is enqueued before its second, so each row's
    # jobs are created in the order of the prompts (the order of the exported caption columns).
    groups: dict[tuple[str | None, int], list[_Planned]] = {}
    for item in planned:
        found = before.get(item.key)
        if force or found is None or found.status != JobStatus.done.value:
            groups.setdefault((item.row.name if requests.by_name else None, item.slot), []).append(item)
    sent: set[int] = set()
    reasons: dict[str, str] = {}
    for (name, slot), items in groups.items():
        result = enqueue_images(
            [item.stored.path for item in items],
            requests.for_name(name)[slot],
            settings,
            force=force,
            recursive=False,
            submission_id=summary.submission_id,
            app=app,
        )
        sent.update(result.job_ids)
        reasons.update(result.rejections)
    with Session(engine) as session:
        after = jobstate.existing_jobs(session, [item.key for item in planned])
        for item in planned:
            found = after.get(item.key)
            if found is None:
                summary.rejected += 1
                summary.rejections.append((item.row.label, reasons.get(str(item.stored.path), "not queued")))
            elif found.id in sent:
                # Two rows with one image and name are one job: the second row finds it queued.
                sent.discard(found.id)
                summary.queued += 1
            elif found.status == JobStatus.done.value:
                summary.already_captioned += 1
            elif found.status == JobStatus.failed.value:
                summary.rejected += 1
                reason = reasons.get(str(item.stored.path), "failed before; `joycap-queue retry` tries again")
                summary.rejections.append((item.row.label, reason))
            else:
                summary.already_queued += 1
        _record_rows(session, source, split, planned, after, current_hash)
        session.commit()


def _record_rows(
    session: Session,
    source: DatasetSource,
    split: str,
    planned: list[_Planned],
    jobs: dict[str, jobstate.ExistingJob],
    current_hash: dict[int, str | None],
) -> None:
    """Link each row to its job; forget links of rows whose image is no longer the one captioned."""
    stale = session.exec(
        select(DatasetRow.id, DatasetRow.row_index, DatasetRow.content_hash).where(
            DatasetRow.dataset == source.key,
            DatasetRow.split == split,
            col(DatasetRow.row_index).in_(list(current_hash)),
        )
    ).all()
    stale_ids = [row_id for row_id, index, content in stale if current_hash.get(index) != content]
    if stale_ids:
        session.execute(delete(DatasetRow).where(col(DatasetRow.id).in_(stale_ids)))
    values = [
        {
            "dataset": source.key,
            "split": split,
            "row_index": item.row.index,
            "row_key": item.row.key,
            "name": item.row.name,
            "content_hash": item.stored.content_hash,
            "job_id": jobs[item.key].id,
        }
        for item in planned
        if item.key in jobs
    ]
    if not values:
        return
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    statement = insert(DatasetRow).on_conflict_do_nothing(
        index_elements=["dataset", "split", "row_index", "job_id"]
    )
    session.execute(statement, values)
