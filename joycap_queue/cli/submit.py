"""`submit`: images and folders in, queued jobs out."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import click
from sqlalchemy.exc import SQLAlchemyError

from joycap_queue.captions.request import build_requests
from joycap_queue.cli.options import (
    ExtraGreedyCommand,
    build_settings,
    connection_options,
    intake_options,
    request_of,
    tiny_model_notice,
)
from joycap_queue.cli.output import echo_rejections, progress
from joycap_queue.errors import ServiceUnavailable
from joycap_queue.intake.enqueue import EnqueueSummary, enqueue_images
from joycap_queue.intake.images import Discovered
from joycap_queue.intake.watch.config import output_options as output_options_for
from joycap_queue.outages import outage, outage_line
from joycap_queue.recovery.requeue import requeue_lost


@click.command(cls=ExtraGreedyCommand)
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--recursive/--no-recursive", default=True, show_default=True, help="Descend into sub-folders.")
@click.option("--force", is_flag=True, help="Queue again images that are already done or failed.")
@intake_options(default_sidecar=())
def submit(paths: tuple[Path, ...], recursive: bool, force: bool, **params: Any) -> None:
    """Queue caption jobs for image files and folders.

    Finds jpg, jpeg, png, webp, bmp, gif and tiff files (recursively by default); other files are
    counted as skipped. An image already captioned with the same prompt, model and settings is
    not queued again unless --force.

    \b
    Examples:
      joycap-queue submit photos/
      joycap-queue submit photos/ -t "Booru-like tag list" -l medium-length --extra 0 1 8 --name Alice
      joycap-queue submit a.jpg b.png --prompt-file prompts.json --prepend "ohwx, "
      joycap-queue submit photos/ -p "Describe the lighting." -p "List the objects."   # 2 jobs per image
    """
    settings = build_settings(params)
    root = paths[0].resolve() if len(paths) == 1 and paths[0].is_dir() else Path.cwd()
    options = request_of(params)
    outputs = output_options_for(
        root,
        sidecar=options.sidecar or (),
        sidecar_mode=options.sidecar_mode,
        move=options.move,
        done_dir=options.done_dir,
        failed_dir=options.failed_dir,
        skip_flagged=options.skip_flagged_sidecars,
    )
    requests = build_requests(settings, replace(options, outputs=outputs))
    tiny_model_notice(settings.model)
    begun = False
    summaries: list[EnqueueSummary] = []
    with progress(0, "submitting") as bar:

        def started(total: int) -> None:
            nonlocal begun
            if not begun:
                bar.length = total * len(requests)
            begun = True

        def advanced(_found: Discovered) -> None:
            bar.update(1)

        try:
            # One request per prompt, all in one submission: the first call creates it.
            for request in requests:
                summaries.append(
                    enqueue_images(
                        paths,
                        request,
                        settings,
                        force=force,
                        recursive=recursive,
                        on_start=started,
                        on_file=advanced,
                        submission_id=summaries[0].submission_id if summaries else None,
                    )
                )
        except Exception as exc:
            reason = outage(exc)
            if reason is None or not begun:
                raise  # nothing was written yet: the plain error says it all
            raise ServiceUnavailable(outage_line(reason, _resume_advice(exc))) from None
    click.echo(_summary_line(summaries))
    rejections = list(dict.fromkeys(item for summary in summaries for item in summary.rejections))
    echo_rejections(rejections, hint=" (joycap-queue results --state failed)")


def _summary_line(summaries: list[EnqueueSummary]) -> str:
    """One line for the whole submission: jobs summed over the prompts, files counted once."""
    first = summaries[0]
    queued = sum(s.queued for s in summaries)
    done = sum(s.already_done for s in summaries)
    waiting = sum(s.already_queued for s in summaries)
    rejected = sum(s.rejected for s in summaries)
    files = f"{first.total} files" + (f", {len(summaries)} prompts" if len(summaries) > 1 else "")
    return (
        f"submission {first.submission_id}: queued {queued}, already done {done}, "
        f"already queued {waiting}, skipped {first.skipped}, rejected {rejected} ({files})"
    )


def _resume_advice(exc: Exception) -> str:
    # Rows are committed before their messages are sent, so what was saved is never lost, and a
    # second submit skips it by its dedup key (sending those it finds without a message).
    service = "the database" if isinstance(exc, SQLAlchemyError) else "Redis"
    return (
        f"the jobs saved so far are kept: run the same submit again once {service} is back to queue the rest"
    )


@click.command()
@click.option(
    "--stale-after",
    type=click.FloatRange(min=0),
    help="Treat a job `running` for longer than this many seconds as lost [default: task time limit + 60].",
)
@click.option(
    "--min-age",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Leave `queued` jobs younger than this alone: their messages may still be on the way.",
)
@connection_options
def requeue(stale_after: float | None, min_age: float, **params: Any) -> None:
    """Send again the jobs whose messages Redis lost (the database is the source of truth).

    Every job the database holds as queued, or as running for longer than a job can take, gets a
    new message unless its message is still in Redis (waiting or delivered). Jobs running on a
    worker that stopped sending heartbeats (killed, its machine gone) go back to the queue first.
    Workers and watchers do the same when they start.

    \b
    Example:
      joycap-queue requeue        # after Redis restarted without its data
    """
    settings = build_settings(params)
    summary = requeue_lost(
        settings,
        stale_after=timedelta(seconds=stale_after) if stale_after is not None else None,
        in_flight=timedelta(seconds=min_age),
    )
    if summary.rescued:
        click.echo(f"{summary.rescued} jobs of workers that died sent again")
    click.echo(
        f"{summary.candidates} jobs waiting: {summary.alive} still have their message, {summary.sent} sent again"
    )


COMMANDS = [submit, requeue]
