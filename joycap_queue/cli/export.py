"""`export` and `submit-dataset`: results out as files or a dataset, Hugging Face datasets in."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from joycap_queue.cli.options import (
    ExtraGreedyCommand,
    build_settings,
    connection_options,
    request_of,
    request_options,
    tiny_model_notice,
)
from joycap_queue.cli.output import echo_rejections, printable, progress
from joycap_queue.errors import OptionError, ServiceUnavailable
from joycap_queue.intake.datasets.source import resolve_source
from joycap_queue.intake.imagestore import store_root
from joycap_queue.outages import outage, outage_line
from joycap_queue.results.export import (
    DEFAULT_CAPTION_COLUMN,
    DEFAULT_NAME_COLUMN,
    FORMATS,
    QUALITY_CHOICES,
    ExportFilter,
    atomic_output,
    count_rows,
    counted,
    extra_columns,
    iter_records,
    write_csv,
    write_jsonl,
    write_parquet,
    write_sidecar_files,
)
from joycap_queue.results.sidecars import SIDECAR_MODES
from joycap_queue.store import engines
from joycap_queue.store.models import JobStatus

STATES = [status.value for status in JobStatus]
SUFFIX_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet"}


def _format_for(fmt: str | None, output: Path | None) -> str:
    if fmt is not None:
        return fmt
    if output is None:
        return "csv"
    if output.suffix.lower() in SUFFIX_FORMATS:
        return SUFFIX_FORMATS[output.suffix.lower()]
    raise OptionError(
        "format", f"cannot tell the format from {output.name}: give --format ({', '.join(FORMATS)})"
    )


def _one_caption_column(fmt: str, caption_columns: tuple[str, ...]) -> str:
    if len(caption_columns) > 1 and fmt != "hf-dataset":
        raise OptionError(
            "caption_column", "several --caption-column names are for --format hf-dataset (one per prompt)"
        )
    return caption_columns[0]


@click.command()
@click.option(
    "--format",
    "-f",
    "fmt",
    type=click.Choice(FORMATS),
    help="[default: from the output's extension, else csv]",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(path_type=Path),
    help="File (csv, jsonl, parquet) or new folder (hf-dataset); csv and jsonl go to stdout without it.",
)
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice(STATES),
    help="Only jobs in this state [default: done].",
)
@click.option(
    "--submission", "submission_ids", multiple=True, type=int, help="Only this submission (repeatable)."
)
@click.option("--path", "path_pattern", help="Only paths matching this glob (* and ?), e.g. '*/cats/*'.")
@click.option("--caption-type", help="Only captions of this type, e.g. Descriptive.")
@click.option("--model", "model_filter", help="Only captions by this model (hub id or folder).")
@click.option("--search", help="Only captions containing these words.")
@click.option(
    "--quality",
    type=click.Choice(QUALITY_CHOICES),
    help="Only captions the quality guard passed (ok: captions stored before the guard count as ok), "
    "flagged, or flagged with this flag.",
)
@click.option(
    "--raw",
    is_flag=True,
    help="Export each caption as it was before the clean-up rules, where they changed it.",
)
@click.option(
    "--source",
    help="Only the rows of this dataset (as given to submit-dataset), in its order; with hf-dataset, "
    "the dataset itself with the caption column added.",
)
@click.option("--split", help="With --source: only this split [default: every split].")
@click.option(
    "--name-column", default=DEFAULT_NAME_COLUMN, show_default=True, help="Column of the image name."
)
@click.option(
    "--caption-column",
    "caption_columns",
    multiple=True,
    default=(DEFAULT_CAPTION_COLUMN,),
    show_default=True,
    help="Column of the caption. hf-dataset with several prompts per image: repeat it, one per prompt "
    "in the order they were submitted (one name gives NAME, NAME_2 …).",
)
@click.option("--columns", multiple=True, help="CSV: job fields to add, e.g. --columns prompt,model,status.")
@click.option(
    "--sidecar-mode",
    type=click.Choice(SIDECAR_MODES),
    default="skip",
    show_default=True,
    help="txt: what to do with an existing image.txt (append/prepend join with '. ').",
)
@click.option("--prepend", default="", help="txt: text put before each caption (a trigger word …).")
@click.option("--append", default="", help="txt: text put after each caption.")
@connection_options
def export(
    fmt: str | None,
    output: Path | None,
    states: tuple[str, ...],
    submission_ids: tuple[int, ...],
    path_pattern: str | None,
    caption_type: str | None,
    model_filter: str | None,
    search: str | None,
    quality: str | None,
    raw: bool,
    source: str | None,
    split: str | None,
    name_column: str,
    caption_columns: tuple[str, ...],
    columns: tuple[str, ...],
    sidecar_mode: str,
    prepend: str,
    append: str,
    **params: Any,
) -> None:
    """Write captions out: CSV, JSONL, Parquet, .txt sidecars, or a Hugging Face dataset.

    CSV has the image name (im_name) and the caption (joy-caption), plus --columns; JSONL and
    Parquet have every field. txt writes image.txt beside each image, as the watcher does.
    hf-dataset writes a `save_to_disk` folder: with --source, the source dataset with the caption
    column added, rows in their original order; otherwise image, name, caption, prompt, model.
    Several prompts per image give one caption column per prompt (and, without --source, one
    row per image): --caption-column once per prompt, in the order they were submitted.

    \b
    Examples:
      joycap-queue export -o captions.csv
      joycap-queue export --source ./my-dataset -o captions.csv --columns prompt,model
      joycap-queue export --format hf-dataset --source ./my-dataset -o ./my-dataset-captioned
      joycap-queue export --format txt --path '*/lora/*' --sidecar-mode overwrite --prepend 'ohwx, '
      joycap-queue export -o all.parquet --state done --state failed
      joycap-queue export -o clean.csv --quality ok      # leave out what the quality guard flagged
    """
    fmt = _format_for(fmt, output)
    caption_column = _one_caption_column(fmt, caption_columns)
    settings = build_settings(params)
    dataset = resolve_source(source) if source is not None else None
    if split is not None and dataset is None:
        raise OptionError("split", "--split needs --source")
    flt = ExportFilter(
        states=states or (JobStatus.done.value,),
        submission_ids=submission_ids,
        path_pattern=path_pattern,
        caption_type=caption_type,
        model=model_filter,
        search=search,
        dataset=dataset.key if dataset is not None else None,
        split=split,
        quality=quality,
        raw=raw,
    )
    added = extra_columns(columns)
    if fmt in ("parquet", "hf-dataset") and output is None:
        raise OptionError("output", f"--format {fmt} needs --output")
    with _stopped_by_outages(fmt, output):
        engine = engines.get_engine(settings.effective_database_url)

        if fmt == "hf-dataset" and dataset is not None:
            from joycap_queue.results.hf_dataset import export_source_dataset

            assert output is not None
            with progress(0, "captions") as bar:

                def started(total: int) -> None:
                    bar.length = total

                counts = export_source_dataset(
                    engine,
                    dataset,
                    flt,
                    output,
                    split=split,
                    caption_columns=caption_columns,
                    on_start=started,
                    advance=bar.update,
                )
            several = f"all {len(counts.columns)} captions ({', '.join(counts.columns)})"
            for name, (rows, filled) in counts.splits.items():
                has = "a caption" if len(counts.columns) == 1 else several
                click.echo(f"{name}: {filled} of {rows} rows have {has}", err=True)
            click.echo(f"wrote {output}", err=True)
            return

        total = count_rows(engine, flt)
        with progress(total, f"exporting {fmt}") as bar:
            records = counted(iter_records(engine, flt), bar.update)
            if fmt == "txt":
                summary = write_sidecar_files(
                    records,
                    mode=sidecar_mode,
                    prepend=prepend,
                    append=append,
                    image_store=store_root(settings),
                )
                click.echo(
                    f"sidecars: wrote {summary.written}, kept {summary.kept} existing, "
                    f"{summary.missing} images missing, {summary.in_store} dataset images left out (use csv or hf-dataset)",
                    err=True,
                )
                return
            if fmt == "hf-dataset":
                from joycap_queue.results.hf_dataset import export_jobs_dataset, prompt_slots

                assert output is not None
                count = export_jobs_dataset(
                    records,
                    output,
                    name_column=name_column,
                    caption_columns=caption_columns,
                    slots=prompt_slots(engine, flt),
                )
            elif fmt == "parquet":
                assert output is not None
                with atomic_output(output) as tmp:
                    count = write_parquet(records, tmp, name_column=name_column)
            elif output is None:
                count = _write_text(fmt, records, sys.stdout, name_column, caption_column, added)
            else:
                with atomic_output(output) as tmp, tmp.open("w", encoding="utf-8", newline="") as out:
                    count = _write_text(fmt, records, out, name_column, caption_column, added)
        click.echo(f"exported {count} rows" + (f" to {output}" if output is not None else ""), err=True)


@contextmanager
def _stopped_by_outages(fmt: str, output: Path | None) -> Iterator[None]:
    """The database lost mid-export ends it with one line: what was and was not written, and that
    running it again is the remedy (files and datasets are replaced whole, sidecars not twice)."""
    try:
        yield
    except Exception as exc:
        reason = outage(exc)
        if reason is None:
            raise
        if fmt == "txt":
            done = "the sidecars written so far are kept and are not written twice"
        elif output is None:
            done = "the output above is incomplete"
        else:
            done = f"nothing was written to {printable(str(output), one_line=True)}"
        raise ServiceUnavailable(
            outage_line(reason, f"{done}; run the same export again once it is back")
        ) from None


def _write_text(
    fmt: str, records: Any, out: Any, name_column: str, caption_column: str, added: tuple[str, ...]
) -> int:
    if fmt == "jsonl":
        return write_jsonl(records, out, name_column=name_column)
    return write_csv(records, out, name_column=name_column, caption_column=caption_column, columns=added)


@click.command("submit-dataset", cls=ExtraGreedyCommand)
@click.argument("source")
@click.option("--split", help="The split to caption [default: train, or the only split].")
@click.option(
    "--image-column", help="Column of the images [default: the dataset's one Image column, else 'image']."
)
@click.option(
    "--id-column", help="Column naming each row in exports [default: im_name, else the image's file name]."
)
@click.option(
    "--name-column",
    help="Column whose value fills the {name} extra option per row (the option is added if missing).",
)
@click.option(
    "--image-store",
    envvar="JOYCAP_IMAGE_STORE",
    show_envvar=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the images are written for the workers; shared by all machines [default: DATA_DIR/images].",
)
@click.option("--force", is_flag=True, help="Queue again rows that already have a caption.")
@request_options
@connection_options
def submit_dataset(
    source: str,
    split: str | None,
    image_column: str | None,
    id_column: str | None,
    name_column: str | None,
    image_store: Path | None,
    force: bool,
    **params: Any,
) -> None:
    """Caption a Hugging Face dataset: a save_to_disk folder, Parquet files, an image folder or a hub name.

    Each image is written once to the image store, where every worker can read it. Submitting
    again queues only the rows without a caption. Get the dataset back with its caption column
    with `export --format hf-dataset --source SOURCE`.

    \b
    Examples:
      joycap-queue submit-dataset ./my-dataset -t Descriptive -l long
      joycap-queue submit-dataset data/train-00000.parquet --id-column im_name --name-column character
      joycap-queue submit-dataset ./photos/            # an image folder (metadata.csv columns too)
      joycap-queue submit-dataset user/dataset --split test   # from the hub, when online
    """
    from joycap_queue.intake.datasets.submit import submit_dataset as run_submit

    settings = build_settings(params)
    if image_store is not None:
        settings = settings.model_copy(update={"image_store": image_store})
    resolved = resolve_source(source)
    tiny_model_notice(settings.model)
    with progress(0, "submitting rows") as bar:

        def started(total: int) -> None:
            bar.length = total

        summary = run_submit(
            resolved,
            settings,
            request_of(params),
            split=split,
            image_column=image_column,
            id_column=id_column,
            name_column=name_column,
            force=force,
            on_start=started,
            on_rows=bar.update,
        )
    click.echo(
        f"submission {summary.submission_id} ({summary.split}): queued {summary.queued}, "
        f"already captioned {summary.already_captioned}, already queued {summary.already_queued}, "
        f"rejected {summary.rejected} ({summary.rows} rows)"
    )
    echo_rejections(summary.rejections)


COMMANDS = [export, submit_dataset]
