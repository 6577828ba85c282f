"""`export --format hf-dataset`: captions as a Hugging Face dataset, written with `save_to_disk`.

With ``--source``, the source dataset itself with a caption column added, rows in their original
order: the captions are streamed from `dataset_row` in row order into an Arrow file beside the
output and joined to the source column-wise, so neither the dataset nor the captions are ever
held in memory. Without it, a new dataset of the exported jobs: image, name, caption, prompt, model.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePath
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session

from joycap_queue.datasource import DatasetSource, choose_split, load_source, require_datasets
from joycap_queue.errors import OptionError
from joycap_queue.exporting import ExportFilter, export_query
from joycap_queue.models import DatasetRow, Job, JobStatus

ARROW_BATCH = 10_000


def check_output_dir(out_dir: Path, source: DatasetSource | None = None) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise OptionError("output", f"{out_dir} exists and is not an empty folder: choose a new folder")
    if source is not None and source.kind != "hub" and out_dir.resolve() == Path(source.location):
        raise OptionError("output", "the output folder must not be the source dataset")


def _best_captions(engine: Engine, flt: ExportFilter) -> Iterator[tuple[int, str]]:
    """(row index, caption) in row order; a row captioned by several jobs comes first with the newest."""
    job, row = Job.__table__, DatasetRow.__table__  # type: ignore[attr-defined]
    with Session(engine) as session:
        query = (
            export_query(session, flt)
            .with_only_columns(row.c.row_index, job.c.caption)
            .order_by(None)
            .order_by(row.c.row_index, job.c.finished_at.desc(), job.c.id.desc())
        )
        result = (
            session.connection().execution_options(stream_results=True, yield_per=ARROW_BATCH).execute(query)
        )
        for index, caption in result:
            yield int(index), caption


def _write_caption_column(
    captions: Iterator[tuple[int, str]], rows: int, path: Path, column: str, advance: Callable[[int], None]
) -> int:
    """An Arrow file of one string column, ``rows`` long, None where a row has no caption."""
    import pyarrow as pa

    schema = pa.schema([pa.field(column, pa.string())])
    filled = 0
    buffer: list[str | None] = []
    pending = next(captions, None)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for index in range(rows):
            while pending is not None and pending[0] < index:
                pending = next(captions, None)
            if pending is not None and pending[0] == index:
                buffer.append(pending[1])
                filled += 1
                pending = next(captions, None)
            else:
                buffer.append(None)
            if len(buffer) >= ARROW_BATCH:
                writer.write_batch(pa.record_batch([pa.array(buffer, pa.string())], schema=schema))
                advance(len(buffer))
                buffer = []
        if buffer:
            writer.write_batch(pa.record_batch([pa.array(buffer, pa.string())], schema=schema))
            advance(len(buffer))
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
    caption_column: str,
    on_start: Callable[[int], None] = lambda _total: None,
    advance: Callable[[int], None] = lambda _n: None,
) -> dict[str, tuple[int, int]]:
    """The source dataset with ``caption_column`` added; split → (rows, rows with a caption).

    Every split is written (a `DatasetDict`), or only ``split`` when one is named.
    """
    datasets = require_datasets()
    check_output_dir(out_dir, source)
    loaded = load_source(source)
    splits = {str(loaded.split or "train"): loaded} if isinstance(loaded, datasets.Dataset) else dict(loaded)
    if split is not None:
        name = choose_split(splits, split)
        splits = {name: splits[name]}
    on_start(sum(len(part) for part in splits.values()))
    counts: dict[str, tuple[int, int]] = {}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".joycap-export-") as tmp:
        captioned = {}
        for name, part in splits.items():
            wanted = dataclasses.replace(flt, dataset=source.key, split=name, states=(JobStatus.done.value,))
            path = Path(tmp) / f"{name}.arrow"
            filled = _write_caption_column(
                _best_captions(engine, wanted), len(part), path, caption_column, advance
            )
            if caption_column in part.column_names:
                part = part.remove_columns([caption_column])
            captions = datasets.Dataset.from_file(str(path))
            captioned[name] = datasets.concatenate_datasets([part, captions], axis=1)
            counts[name] = (len(part), filled)
        if isinstance(loaded, datasets.Dataset) or split is not None:
            _save(next(iter(captioned.values())), out_dir)
        else:
            _save(datasets.DatasetDict(captioned), out_dir)
        del captioned
    return counts


def export_jobs_dataset(
    records: Iterable[dict[str, Any]], out_dir: Path, *, name_column: str, caption_column: str
) -> int:
    """A dataset of the exported jobs: the image, its name, caption, prompt, model, quantization, adapter."""
    datasets = require_datasets()
    from datasets.arrow_writer import ArrowWriter

    columns = ["image", name_column, caption_column, "prompt", "model", "quantize", "adapter"]
    if len(set(columns)) != len(columns):
        raise OptionError("caption_column", f"the columns must have distinct names: {', '.join(columns)}")
    check_output_dir(out_dir)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            **{name: datasets.Value("string") for name in columns[1:]},
        }
    )
    count = 0
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".joycap-export-") as tmp:
        path = Path(tmp) / "jobs.arrow"
        writer = ArrowWriter(features=features, path=str(path))
        try:
            for record in records:
                try:
                    data = Path(record["path"]).read_bytes()
                    image = {"bytes": data, "path": PurePath(record["path"]).name}
                except OSError:
                    image = None  # moved or deleted since: the row keeps its caption
                writer.write(
                    {
                        "image": image,
                        name_column: record["image_name"],
                        caption_column: record["caption"],
                        "prompt": record["prompt"],
                        "model": record["model"],
                        "quantize": record.get("quantize") or "none",
                        # The folder means little on another machine; the hash names the weights.
                        "adapter": record.get("adapter_hash") or "",
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
