"""`export --format hf-dataset`: captions as a Hugging Face dataset, written with `save_to_disk`.

With ``--source``, the source dataset itself with a caption column added, rows in their original
order: the captions are streamed from `dataset_row` in row order into an Arrow file beside the
output and joined to the source column-wise, so neither the dataset nor the captions are ever
held in memory. Without it, a new dataset of the exported jobs: image, name, caption, prompt, model.

Several prompts per image (`submit -p A -p B`) give one caption column per prompt. The columns
follow the prompts' order: for each row (or image), its distinct prompts in the order of their
first job, which is the order they were given to submit. A job of any state counts for that
order, so a prompt whose job failed leaves its column empty rather than moving the next one in.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session

from joycap_queue.errors import OptionError
from joycap_queue.intake.datasets.source import DatasetSource, choose_split, load_source, require_datasets
from joycap_queue.results.export import ExportFilter, caption_expression, export_query
from joycap_queue.store.models import DatasetRow, Job, JobStatus

ARROW_BATCH = 10_000
ALL_STATES = tuple(status.value for status in JobStatus)


@dataclass
class SourceExport:
    """What `export_source_dataset` wrote: its caption columns, and per split (rows, rows with
    every caption)."""

    columns: list[str]
    splits: dict[str, tuple[int, int]]


def check_output_dir(out_dir: Path, source: DatasetSource | None = None) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise OptionError("output", f"{out_dir} exists and is not an empty folder: choose a new folder")
    if source is not None and source.kind != "hub" and out_dir.resolve() == Path(source.location):
        raise OptionError("output", "the output folder must not be the source dataset")


def caption_column_names(given: Sequence[str], prompts: int) -> list[str]:
    """One column name per prompt: the names given (one per prompt), or NAME, NAME_2, NAME_3 …"""
    names = list(given)
    if len(set(names)) != len(names):
        raise OptionError(
            "caption_column", f"the caption columns must have distinct names: {', '.join(names)}"
        )
    if prompts <= 1:
        if len(names) > 1:
            raise OptionError(
                "caption_column",
                f"{len(names)} --caption-column names, but the captions have one prompt per image",
            )
        return names
    if len(names) == 1:
        return [names[0], *(f"{names[0]}_{number}" for number in range(2, prompts + 1))]
    if len(names) != prompts:
        raise OptionError(
            "caption_column",
            f"the captions have {prompts} prompts per image but {len(names)} --caption-column names: "
            "give one per prompt, in the order of the prompts (or one, for NAME, NAME_2 …)",
        )
    return names


def _rank_filter(flt: ExportFilter) -> ExportFilter:
    # Every job of a row decides the order of its prompts, whatever its state or caption.
    return dataclasses.replace(flt, states=ALL_STATES, search=None, quality=None)


def _stream(engine: Engine, query: Any) -> Iterator[Any]:
    with Session(engine) as session:
        yield from (
            session.connection().execution_options(stream_results=True, yield_per=ARROW_BATCH).execute(query)
        )


def _prompt_orders(engine: Engine, flt: ExportFilter) -> Iterator[tuple[int, list[str]]]:
    """(row index, its distinct prompts in order of first job) for each row with a job, in row order."""
    job, row = Job.__table__, DatasetRow.__table__  # type: ignore[attr-defined]
    with Session(engine) as session:
        query = (
            export_query(session, _rank_filter(flt))
            .with_only_columns(row.c.row_index, job.c.prompt)
            .order_by(None)
            .order_by(row.c.row_index, job.c.id)
        )
    current: int | None = None
    prompts: dict[str, None] = {}
    for index, prompt in _stream(engine, query):
        if index != current:
            if current is not None:
                yield current, list(prompts)
            current, prompts = int(index), {}
        prompts.setdefault(prompt, None)
    if current is not None:
        yield current, list(prompts)


def _best_captions(engine: Engine, flt: ExportFilter) -> Iterator[tuple[int, str, str]]:
    """(row index, prompt, caption) in row order; a row's prompt captioned by several jobs comes
    first with the newest."""
    job, row = Job.__table__, DatasetRow.__table__  # type: ignore[attr-defined]
    with Session(engine) as session:
        query = (
            export_query(session, flt)
            .with_only_columns(row.c.row_index, job.c.prompt, caption_expression(flt))
            .order_by(None)
            .order_by(row.c.row_index, job.c.finished_at.desc(), job.c.id.desc())
        )
    for index, prompt, caption in _stream(engine, query):
        yield int(index), prompt, caption


def _row_captions(engine: Engine, flt: ExportFilter) -> Iterator[tuple[int, list[str | None]]]:
    """(row index, its captions by prompt, None where a prompt has none exported), in row order."""
    captions = _best_captions(engine, flt)
    pending = next(captions, None)
    for index, prompts in _prompt_orders(engine, flt):
        found: dict[str, str] = {}
        while pending is not None and pending[0] <= index:
            if pending[0] == index:
                found.setdefault(pending[1], pending[2])
            pending = next(captions, None)
        yield index, [found.get(prompt) for prompt in prompts]


def _write_caption_columns(
    captions: Iterator[tuple[int, list[str | None]]],
    rows: int,
    path: Path,
    columns: list[str],
    advance: Callable[[int], None],
) -> int:
    """An Arrow file of string columns, ``rows`` long, None where a row has no such caption;
    returns the rows with every caption."""
    import pyarrow as pa

    schema = pa.schema([pa.field(column, pa.string()) for column in columns])
    filled = 0
    buffers: list[list[str | None]] = [[] for _ in columns]
    pending = next(captions, None)

    def flush(writer: Any) -> None:
        batch = pa.record_batch([pa.array(buffer, pa.string()) for buffer in buffers], schema=schema)
        writer.write_batch(batch)
        advance(len(buffers[0]))
        for buffer in buffers:
            buffer.clear()

    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for index in range(rows):
            while pending is not None and pending[0] < index:
                pending = next(captions, None)
            found: list[str | None] = []
            if pending is not None and pending[0] == index:
                found = pending[1]
                pending = next(captions, None)
            values = [found[slot] if slot < len(found) else None for slot in range(len(columns))]
            filled += all(value is not None for value in values)
            for buffer, value in zip(buffers, values, strict=True):
                buffer.append(value)
            if len(buffers[0]) >= ARROW_BATCH:
                flush(writer)
        if buffers[0]:
            flush(writer)
    return filled


def _save(dataset: Any, out_dir: Path) -> None:
    datasets = require_datasets()
    if sys.stderr.isatty():
        datasets.enable_progress_bars()
    try:
        dataset.save_to_disk(str(out_dir))
    finally:
        datasets.disable_progress_bars()


def export_source_dataset(
    engine: Engine,
    source: DatasetSource,
    flt: ExportFilter,
    out_dir: Path,
    *,
    split: str | None = None,
    caption_columns: Sequence[str],
    on_start: Callable[[int], None] = lambda _total: None,
    advance: Callable[[int], None] = lambda _n: None,
) -> SourceExport:
    """The source dataset with a caption column per prompt added (see `caption_column_names`).

    Every split is written (a `DatasetDict`), or only ``split`` when one is named.
    """
    datasets = require_datasets()
    check_output_dir(out_dir, source)
    loaded = load_source(source)
    splits = {str(loaded.split or "train"): loaded} if isinstance(loaded, datasets.Dataset) else dict(loaded)
    if split is not None:
        name = choose_split(splits, split)
        splits = {name: splits[name]}
    wanted = {
        name: dataclasses.replace(flt, dataset=source.key, split=name, states=(JobStatus.done.value,))
        for name in splits
    }
    # One set of columns for every split: the most prompts any row has.
    prompts = max(
        (len(found) for name in splits for _, found in _prompt_orders(engine, wanted[name])), default=1
    )
    columns = caption_column_names(caption_columns, prompts)
    on_start(sum(len(part) for part in splits.values()))
    counts: dict[str, tuple[int, int]] = {}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".joycap-export-") as tmp:
        captioned = {}
        for name, part in splits.items():
            path = Path(tmp) / f"{name}.arrow"
            filled = _write_caption_columns(
                _row_captions(engine, wanted[name]), len(part), path, columns, advance
            )
            replaced = [column for column in columns if column in part.column_names]
            if replaced:
                part = part.remove_columns(replaced)
            captions = datasets.Dataset.from_file(str(path))
            captioned[name] = datasets.concatenate_datasets([part, captions], axis=1)
            counts[name] = (len(part), filled)
        if isinstance(loaded, datasets.Dataset) or split is not None:
            _save(next(iter(captioned.values())), out_dir)
        else:
            _save(datasets.DatasetDict(captioned), out_dir)
        del captioned
    return SourceExport(columns, counts)


def _image_key(
    path: str, name: str | None, model: str, quantize: str | None, adapter: str | None
) -> tuple[str, ...]:
    # One output row per image (and name: a dataset row), model and variant, as before several prompts.
    return (path, name or PurePath(path).name, model, quantize or "none", adapter or "")


def prompt_slots(engine: Engine, flt: ExportFilter) -> dict[int, int]:
    """Job id → its prompt's place among its image's prompts (0 for the first), for
    `export_jobs_dataset`; every job the filter selects in any state counts for the order."""
    job, row = Job.__table__, DatasetRow.__table__  # type: ignore[attr-defined]
    slots: dict[int, int] = {}
    seen: dict[tuple[str, ...], dict[str, int]] = {}
    with Session(engine) as session:
        query = (
            export_query(session, _rank_filter(flt))
            .with_only_columns(
                job.c.id,
                job.c.path,
                row.c.row_key,
                job.c.model,
                job.c.quantize,
                job.c.adapter_hash,
                job.c.prompt,
            )
            .order_by(None)
            .order_by(job.c.id)
        )
        result = (
            session.connection().execution_options(stream_results=True, yield_per=ARROW_BATCH).execute(query)
        )
        for job_id, path, row_key, model, quantize, adapter, prompt in result:
            prompts = seen.setdefault(_image_key(path, row_key, model, quantize, adapter), {})
            slots[int(job_id)] = prompts.setdefault(prompt, len(prompts))
    return slots


def export_jobs_dataset(
    records: Iterable[dict[str, Any]],
    out_dir: Path,
    *,
    name_column: str,
    caption_columns: Sequence[str],
    slots: Mapping[int, int] | None = None,
) -> int:
    """A dataset of the exported jobs: the image, its name, caption, prompt, model, quantization, adapter.

    With several prompts per image (``slots``, from `prompt_slots`), one row per image instead,
    with a caption column and a ``<column>_prompt`` column per prompt; returns the rows written.
    """
    datasets = require_datasets()
    from datasets.arrow_writer import ArrowWriter

    check_output_dir(out_dir)
    kept = ("id", "path", "image_name", "caption", "prompt", "model", "quantize", "adapter_hash")
    # Only what a row needs is kept: an image's jobs may come far apart.
    slims: list[dict[str, Any]] = [{name: record.get(name) for name in kept} for record in records]
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for slim in slims:
        key = _image_key(
            slim["path"], slim["image_name"], slim["model"], slim["quantize"], slim["adapter_hash"]
        )
        groups.setdefault(key, []).append(slim)
    slot_of = slots or {}
    prompts = 1 + max((slot_of.get(slim["id"], 0) for slim in slims), default=0)
    captions = caption_column_names(caption_columns, prompts)
    prompt_columns = ["prompt"] if prompts == 1 else [f"{column}_prompt" for column in captions]
    columns = ["image", name_column, *captions, *prompt_columns, "model", "quantize", "adapter"]
    if len(set(columns)) != len(columns):
        raise OptionError("caption_column", f"the columns must have distinct names: {', '.join(columns)}")
    features = datasets.Features(
        {"image": datasets.Image(), **{name: datasets.Value("string") for name in columns[1:]}}
    )
    if prompts == 1:
        # One row per job, as with one prompt always.
        rows: Iterable[list[dict[str, Any]]] = ([slim] for slim in slims)
    else:
        rows = groups.values()
    count = 0
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".joycap-export-") as tmp:
        path = Path(tmp) / "jobs.arrow"
        writer = ArrowWriter(features=features, path=str(path))
        try:
            for group in rows:
                first = group[0]
                try:
                    data = Path(first["path"]).read_bytes()
                    image = {"bytes": data, "path": PurePath(first["path"]).name}
                except OSError:
                    image = None  # moved or deleted since: the row keeps its caption
                texts: list[str | None] = [None] * prompts
                used: list[str | None] = [None] * prompts
                for record in sorted(group, key=lambda r: r["id"]):
                    slot = slot_of.get(record["id"], 0) if prompts > 1 else 0
                    texts[slot], used[slot] = record["caption"], record["prompt"]
                writer.write(
                    {
                        "image": image,
                        name_column: first["image_name"],
                        **dict(zip(captions, texts, strict=True)),
                        **dict(zip(prompt_columns, used, strict=True)),
                        "model": first["model"],
                        "quantize": first["quantize"] or "none",
                        # The folder means little on another machine; the hash names the weights.
                        "adapter": first["adapter_hash"] or "",
                    }
                )
                count += 1
            writer.finalize()
        finally:
            writer.close()
        dataset = datasets.Dataset.from_file(str(path))
        _save(dataset, out_dir)
        del dataset
    return count
