"""`export`: results out of the database as CSV, JSONL, Parquet or `.txt` sidecars, streamed.

Rows are read from a server-side cursor (PostgreSQL) or a stepping SQLite cursor, 1,000 at a time,
and written as they come, so exporting 100,000 jobs holds a few batches in memory, not the table.
A job that captions rows of a dataset is exported once per row, named by the row's id column
(`im_name`), so the CSV joins back onto the dataset; any other job is named by its file name.
Hugging Face dataset output is in `exporting_hf`.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import IO, Any

from sqlalchemy import ColumnElement, Select, and_, func, or_, select
from sqlalchemy.engine import Engine
from sqlmodel import Session, col

from joycap_queue.captions import prompts
from joycap_queue.captions.quality import FLAGS
from joycap_queue.captions.request import normalize_model
from joycap_queue.errors import JoycapError, OptionError
from joycap_queue.files import replacing, write_atomic
from joycap_queue.intake.images import IMAGE_EXTENSIONS
from joycap_queue.results.sidecars import SIDECAR_MODES, merge_caption, sidecar_named
from joycap_queue.store import queries
from joycap_queue.store.models import DatasetRow, Job, JobPublic, JobStatus
from joycap_queue.store.search import WhereClause

FORMATS = ("csv", "jsonl", "parquet", "txt", "hf-dataset")
DEFAULT_NAME_COLUMN = "im_name"
DEFAULT_CAPTION_COLUMN = "joy-caption"
JOB_FIELDS = ("id", "submission_id", *(f for f in JobPublic.model_fields if f not in ("id", "submission_id")))
DATASET_FIELDS = ("dataset", "split", "row_index")
RECORD_FIELDS = (*JOB_FIELDS, *DATASET_FIELDS)
TIME_FIELDS = ("queued_at", "started_at", "finished_at")
INT_FIELDS = (
    "id",
    "submission_id",
    "size_bytes",
    "width",
    "height",
    "attempts",
    "prompt_tokens",
    "output_tokens",
    "caption_attempts",
    "row_index",
)
# `--quality`: "ok" (never flagged), "flagged" (any flag), or one flag of the kept caption.
QUALITY_CHOICES = ("ok", "flagged", *FLAGS)
STREAM_ROWS = 1000
# Rows per Parquet row group: each is built in memory whole (measured: 5,000 rows of 500-character
# captions peak at 240 MB, 1,000 at about 150 MB).
PARQUET_BATCH = 1000


@dataclass(frozen=True)
class ExportFilter:
    """Which jobs to export; every given filter must hold."""

    states: tuple[str, ...] = (JobStatus.done.value,)
    submission_ids: tuple[int, ...] = ()
    path_pattern: str | None = None
    caption_type: str | None = None
    model: str | None = None
    search: str | None = None
    dataset: str | None = None  # a DatasetSource key: only that dataset's rows, in its order
    split: str | None = None
    quality: str | None = None  # one of QUALITY_CHOICES
    # Not a filter: `--raw` exports the caption as it was before the clean-up rules, where one
    # was kept; here so that every writer (and exporting_hf) sees it with the filter it gets.
    raw: bool = False


def canonical_caption_type(text: str) -> str:
    """The stored caption type name for what the user typed, in whichever vocabulary knows it."""
    first_error: OptionError | None = None
    for profile in ("beta-one", "alpha-two"):
        try:
            return prompts.resolve_caption_type(profile, text)
        except OptionError as exc:
            first_error = first_error or exc
    assert first_error is not None
    raise first_error


def quality_condition(quality: str) -> WhereClause:
    """The WHERE clause of `--quality` on `job` (results, export, retry)."""
    column = col(Job.quality)
    if quality == "ok":
        # A caption stored before the guard existed (NULL) was never flagged: it counts as ok. A
        # queued or failed job has NULL too, but no caption to be ok.
        return and_(col(Job.status) == JobStatus.done.value, or_(column.is_(None), column == "ok"))
    if quality == "flagged":
        return and_(column.is_not(None), column != "ok")
    if quality not in FLAGS:
        raise OptionError("quality", f"choose one of: {', '.join(QUALITY_CHOICES)}")
    # The column is the flags joined by ","; no flag name is a substring of another (nor holds a
    # LIKE wildcard), so this matches exactly the captions that have this flag.
    return column.like(f"%{quality}%")


def caption_expression(flt: ExportFilter) -> ColumnElement[Any]:
    """The caption column to select: with ``raw``, the text before the clean-up rules if kept."""
    job = Job.__table__  # type: ignore[attr-defined]
    return func.coalesce(job.c.raw_caption, job.c.caption) if flt.raw else job.c.caption


def export_query(session: Session, flt: ExportFilter) -> Select[Any]:
    """Job columns plus the dataset row (if any) of every row to export, in export order."""
    job, row = Job.__table__, DatasetRow.__table__  # type: ignore[attr-defined]
    columns = [*job.c, row.c.dataset, row.c.split, row.c.row_index, row.c.row_key]
    if flt.dataset is not None:
        query = select(*columns).select_from(job.join(row, row.c.job_id == job.c.id))
        query = query.where(row.c.dataset == flt.dataset)
        if flt.split is not None:
            query = query.where(row.c.split == flt.split)
        query = query.order_by(row.c.split, row.c.row_index, job.c.id)
    else:
        query = select(*columns).select_from(job.outerjoin(row, row.c.job_id == job.c.id))
        # By path first: an image captioned with several prompts (one job each) comes together,
        # its jobs in the order they were queued; a job's dataset rows stay next to each other,
        # which the sidecar writer relies on to write each job once.
        query = query.order_by(job.c.path, job.c.id, row.c.split, row.c.row_index)
    conditions = queries.job_conditions(
        session,
        states=flt.states,
        submission_ids=flt.submission_ids,
        path_pattern=flt.path_pattern,
        search=flt.search,
    )
    for condition in conditions:
        query = query.where(condition)
    if flt.caption_type:
        query = query.where(col(Job.caption_type) == canonical_caption_type(flt.caption_type))
    if flt.model:
        query = query.where(col(Job.model) == normalize_model(flt.model))
    if flt.quality:
        query = query.where(quality_condition(flt.quality))
    return query


def count_rows(engine: Engine, flt: ExportFilter) -> int:
    with Session(engine) as session:
        query = export_query(session, flt).order_by(None).subquery()
        return int(session.execute(select(func.count()).select_from(query)).scalar_one())


def _utc(value: datetime | None) -> datetime | None:
    # Both databases hand back naive datetimes; every stored time is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


def _record(row: Any, *, raw: bool = False) -> dict[str, Any]:
    record = {name: row[name] for name in RECORD_FIELDS}
    if raw and record["raw_caption"] is not None:
        record["caption"] = record["raw_caption"]
    record["extra_options"] = json.loads(record["extra_options"] or "[]")
    record["gen_params"] = json.loads(record["gen_params"] or "{}")
    for name in TIME_FIELDS:
        record[name] = _utc(record[name])
    key = row["row_key"]
    record["image_name"] = key if key is not None else PurePath(record["path"]).name
    return record


def iter_records(engine: Engine, flt: ExportFilter) -> Iterator[dict[str, Any]]:
    """Every row to export as a dict of all its fields, streamed from the database."""
    with Session(engine) as session:
        query = export_query(session, flt)
        result = (
            session.connection().execution_options(stream_results=True, yield_per=STREAM_ROWS).execute(query)
        )
        for row in result.mappings():
            yield _record(row, raw=flt.raw)


def text_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    return str(value)


def extra_columns(names: Iterable[str]) -> tuple[str, ...]:
    """The job fields `--columns` asks for (comma-separated or repeated), checked."""
    wanted = [part.strip() for name in names for part in name.split(",") if part.strip()]
    unknown = [name for name in wanted if name not in RECORD_FIELDS]
    if unknown:
        raise OptionError(
            "columns", f"unknown column {unknown[0]!r}; choose from: {', '.join(RECORD_FIELDS)}"
        )
    return tuple(dict.fromkeys(wanted))


def write_csv(
    records: Iterable[dict[str, Any]],
    out: IO[str],
    *,
    name_column: str = DEFAULT_NAME_COLUMN,
    caption_column: str = DEFAULT_CAPTION_COLUMN,
    columns: tuple[str, ...] = (),
) -> int:
    writer = csv.writer(out)
    writer.writerow([name_column, caption_column, *columns])
    count = 0
    for record in records:
        writer.writerow(
            [record["image_name"], text_value(record["caption"]), *(text_value(record[c]) for c in columns)]
        )
        count += 1
    return count


def _json_default(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def write_jsonl(
    records: Iterable[dict[str, Any]], out: IO[str], *, name_column: str = DEFAULT_NAME_COLUMN
) -> int:
    count = 0
    for record in records:
        line = {name_column: record["image_name"], **{name: record[name] for name in RECORD_FIELDS}}
        out.write(json.dumps(line, ensure_ascii=False, default=_json_default) + "\n")
        count += 1
    return count


def write_parquet(
    records: Iterable[dict[str, Any]], path: Path, *, name_column: str = DEFAULT_NAME_COLUMN
) -> int:
    """Every field, typed: integers, UTC timestamps, extra options as a list, the rest as text."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise JoycapError("Parquet export needs pyarrow: pip install 'joycap-queue[datasets]'") from None

    def arrow_type(name: str) -> Any:
        if name in INT_FIELDS:
            return pa.int64()
        if name in TIME_FIELDS:
            return pa.timestamp("us", tz="UTC")
        if name == "extra_options":
            return pa.list_(pa.int64())
        return pa.string()

    names = [name_column, *(n for n in RECORD_FIELDS if n != name_column)]
    schema = pa.schema([(name, arrow_type(name)) for name in names])
    count = 0
    with pq.ParquetWriter(str(path), schema) as writer:
        for chunk in _chunks(records, PARQUET_BATCH):
            rows = []
            for record in chunk:
                row = dict(record, gen_params=json.dumps(record["gen_params"], sort_keys=True))
                row[name_column] = record["image_name"]
                rows.append(row)
            writer.write_batch(pa.RecordBatch.from_pylist(rows, schema=schema))
            count += len(rows)
    return count


def _chunks(records: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for record in records:
        chunk.append(record)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass
class SidecarSummary:
    written: int = 0
    kept: int = 0
    missing: int = 0
    in_store: int = 0


class _SidecarNames:
    """`sidecars.sidecar_path`'s rule (a.txt, or a.jpg.txt when a.png shares the folder) with each
    folder listed once: listing it per image makes a 100,000-image folder quadratic."""

    def __init__(self) -> None:
        self._shared_stems: dict[Path, set[str]] = {}

    def _shared(self, folder: Path) -> set[str]:
        shared = self._shared_stems.get(folder)
        if shared is None:
            seen: set[str] = set()
            shared = set()
            try:
                for entry in os.scandir(folder):
                    stem, suffix = os.path.splitext(entry.name)
                    if suffix.lower() in IMAGE_EXTENSIONS:
                        (shared if stem in seen else seen).add(stem)
            except OSError:
                pass
            self._shared_stems[folder] = shared
        return shared

    def txt_for(self, image: Path) -> Path:
        return sidecar_named(image, ".txt", full_name=image.stem in self._shared(image.parent))


def write_sidecar_files(
    records: Iterable[dict[str, Any]],
    *,
    mode: str = "skip",
    prepend: str = "",
    append: str = "",
    image_store: Path | None = None,
) -> SidecarSummary:
    """`image.txt` beside every captioned image, merged with an existing one as the watcher does.

    Images in the image store (dataset rows) have no folder of their own and are left out.
    """
    if mode not in SIDECAR_MODES:
        raise OptionError("sidecar_mode", f"choose one of: {', '.join(SIDECAR_MODES)}")
    summary = SidecarSummary()
    names = _SidecarNames()
    previous: int | None = None
    for record in records:
        # A job linked to several dataset rows comes once per row; its file gets one sidecar.
        if record["id"] == previous or record["caption"] is None:
            continue
        previous = record["id"]
        image = Path(record["path"])
        if image_store is not None and image.is_relative_to(image_store):
            summary.in_store += 1
            continue
        if not image.exists():
            summary.missing += 1
            continue
        target = names.txt_for(image)
        existing = target.read_bytes().decode("utf-8", errors="replace") if target.exists() else None
        text = merge_caption(existing, prepend + record["caption"] + append, mode)
        if text is None:
            summary.kept += 1
            continue
        write_atomic(target, text)
        summary.written += 1
    return summary


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces it only when the export finished."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        yield tmp


def counted(
    records: Iterable[dict[str, Any]], advance: Callable[[int], None], every: int = 1000
) -> Iterator[dict[str, Any]]:
    """The records, calling ``advance`` every ``every`` of them (a progress bar per row is slow)."""
    pending = 0
    for record in records:
        yield record
        pending += 1
        if pending >= every:
            advance(pending)
            pending = 0
    if pending:
        advance(pending)
