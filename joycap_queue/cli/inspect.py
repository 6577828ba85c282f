"""`status` and `results`: what the database says about the jobs."""

from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext
from datetime import timedelta
from typing import Any

import click
from sqlalchemy import func
from sqlmodel import Session, col, select

from joycap_queue.captions.quality import FLAGS
from joycap_queue.cli.options import build_settings, connection_options, tiny_model_notice
from joycap_queue.cli.output import printable, table
from joycap_queue.intake.watch.watcher import STALE_AFTER
from joycap_queue.outages import OutageWait
from joycap_queue.recovery.sweep import WORKER_KIND, stale_after
from joycap_queue.results.export import QUALITY_CHOICES, quality_condition
from joycap_queue.store import engines, queries
from joycap_queue.store.models import Job, JobPublic, JobStatus, utcnow

FLOWER_STALE = timedelta(seconds=20)

RATE_WINDOW = timedelta(minutes=5)
STATES = [status.value for status in JobStatus]


def _format_eta(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def status_report(
    session: Session, submission_id: int | None, *, worker_stale: timedelta = timedelta(seconds=20)
) -> tuple[str, dict[str, int]]:
    counts = queries.status_counts(session, submission_id=submission_id)
    total = sum(counts.values())
    rate = queries.rate_per_minute(session, window=RATE_WINDOW, submission_id=submission_id)
    remaining = counts["queued"] + counts["running"]
    scope = f"submission {submission_id}" if submission_id is not None else "all jobs"
    lines = [
        f"{scope}: " + ", ".join(f"{state} {counts[state]}" for state in STATES) + f" (total {total})",
        f"rate: {rate:.1f} images/min over the last {int(RATE_WINDOW.total_seconds() // 60)} min",
    ]
    if counts["done"]:
        lines.append(quality_line(quality_counts(session, submission_id)))
    if remaining and rate > 0:
        lines.append(f"eta: {_format_eta(remaining / rate * 60)} for {remaining} images")
    elif remaining:
        lines.append(f"eta: unknown ({remaining} images waiting, nothing finished recently)")
    lines.extend(watcher_lines(session))
    lines.extend(worker_lines(session, worker_stale))
    for endpoint in queries.active_endpoints(session, kind="flower", stale_after=FLOWER_STALE):
        lines.append(f"flower: {endpoint.url} (pid {endpoint.pid} on {endpoint.host})")
    return "\n".join(lines), counts


def quality_counts(session: Session, submission_id: int | None) -> dict[str | None, int]:
    """Done jobs by their quality column (None: stored before the guard), in one grouped query."""
    query = select(Job.quality, func.count()).where(col(Job.status) == JobStatus.done.value)
    if submission_id is not None:
        query = query.where(col(Job.submission_id) == submission_id)
    return {quality: int(count) for quality, count in session.exec(query.group_by(col(Job.quality)))}


def quality_line(counts: dict[str | None, int]) -> str:
    """`quality: 120 ok, 4 flagged (truncated 3, repetitive 1)`; a caption with two flags counts
    under each, so the flags can add up to more than the flagged captions."""
    unchecked = counts.get(None, 0)
    ok = counts.get("ok", 0) + unchecked
    by_flag: dict[str, int] = {}
    flagged = 0
    for quality, count in counts.items():
        if quality is None or quality == "ok":
            continue
        flagged += count
        for flag in quality.split(","):
            by_flag[flag] = by_flag.get(flag, 0) + count
    rank = {flag: index for index, flag in enumerate(FLAGS)}
    ordered = sorted(by_flag.items(), key=lambda item: (-item[1], rank.get(item[0], len(FLAGS)), item[0]))
    line = f"quality: {ok} ok"
    if unchecked:
        line += f" ({unchecked} from before the quality guard)"
    line += f", {flagged} flagged"
    if ordered:
        line += " (" + ", ".join(f"{flag} {count}" for flag, count in ordered) + ")"
    return line


def matching_jobs(
    session: Session,
    *,
    states: tuple[str, ...],
    submission_id: int | None,
    path_pattern: str | None,
    search: str | None,
    quality: str | None,
    limit: int | None,
) -> list[JobPublic]:
    """`queries.list_jobs` with `--quality` too (its condition is shared with export and retry)."""
    conditions = queries.job_conditions(
        session,
        states=states,
        submission_ids=[submission_id] if submission_id is not None else [],
        path_pattern=path_pattern,
        search=search,
    )
    if quality is not None:
        conditions.append(quality_condition(quality))
    query = select(Job).where(*conditions).order_by(col(Job.id))
    if limit is not None:
        query = query.limit(limit)
    return [JobPublic.model_validate(job) for job in session.exec(query)]


def worker_lines(session: Session, stale_after: timedelta) -> list[str]:
    """Live workers (a heartbeat within ``stale_after``) and their model's state."""
    workers = queries.active_endpoints(session, kind=WORKER_KIND, stale_after=stale_after)
    if not workers:
        return []
    lines = ["workers:"]
    for worker in sorted(workers, key=lambda w: w.url):
        lines.append(
            f"  {printable(worker.url, one_line=True)}: {worker.state or 'loaded'} (pid {worker.pid} on {worker.host})"
        )
    return lines


def watcher_lines(session: Session) -> list[str]:
    watchers = queries.active_watchers(session, stale_after=STALE_AFTER)
    if not watchers:
        return []
    lines = ["watchers:"]
    now = utcnow()
    for watcher in watchers:
        finished = (
            queries.status_counts(session, submission_id=watcher.submission_id)
            if watcher.submission_id
            else {}
        )
        beat = (
            watcher.heartbeat_at
            if watcher.heartbeat_at.tzinfo
            else watcher.heartbeat_at.replace(tzinfo=now.tzinfo)
        )
        lines.append(
            f"  {printable(watcher.inbox, one_line=True)}: seen {watcher.seen}, queued {watcher.queued}, "
            f"waiting to settle {watcher.waiting}, done {finished.get('done', 0)}, failed {finished.get('failed', 0)} "
            f"(pid {watcher.pid} on {watcher.host}, heartbeat {int((now - beat).total_seconds())} s ago)"
        )
    return lines


@click.command()
@click.option("--submission", "submission_id", type=int, help="Only this submission (see `submit`'s output).")
@click.option("--latest", is_flag=True, help="Only the latest submission.")
@click.option("--watch", is_flag=True, help="Refresh until Ctrl-C.")
@click.option("--until-done", is_flag=True, help="With --watch: stop once nothing is queued or running.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=2.0, show_default=True, help="Seconds.")
@click.option(
    "--timeout", type=click.FloatRange(min=0), help="With --until-done: give up (exit 1) after this."
)
@connection_options
def status(
    submission_id: int | None,
    latest: bool,
    watch: bool,
    until_done: bool,
    interval: float,
    timeout: float | None,
    **params: Any,
) -> None:
    """Show job counts by state, images per minute and the time left.

    \b
    Examples:
      joycap-queue status
      joycap-queue status --latest --watch --until-done
    """
    settings = build_settings(params)
    tiny_model_notice(settings.model)
    engine = engines.get_engine(settings.effective_database_url)
    started = time.monotonic()
    with Session(engine) as session:
        if latest:
            submission_id = queries.latest_submission_id(session)
    # Once it has answered, a database that goes away (a restart, a failover, a lock held past
    # the busy timeout) is waited for: --watch is meant to be left running.
    outages = OutageWait(
        lambda line: click.echo(line, err=True), retry_s=interval, back="the database answers again; going on"
    )
    while True:
        counts = None
        with outages.guard(time.monotonic()) if watch else nullcontext(), Session(engine) as session:
            report, counts = status_report(session, submission_id, worker_stale=stale_after(settings))
        if counts is not None:
            if watch and sys.stdout.isatty():
                click.clear()
            click.echo(report)
            if not watch:
                return
            if until_done and counts["queued"] + counts["running"] == 0:
                return
        if timeout is not None and time.monotonic() - started > timeout:
            raise click.ClickException(f"still not done after {timeout:g} s")
        time.sleep(interval)
        if not sys.stdout.isatty() and counts is not None:
            click.echo("")


@click.command()
@click.option("--state", "states", multiple=True, type=click.Choice(STATES), help="Only jobs in this state.")
@click.option("--submission", "submission_id", type=int, help="Only this submission.")
@click.option("--path", "path_pattern", help="Only paths matching this glob (* and ?), e.g. '*/cats/*'.")
@click.option("--search", help="Only captions containing these words (full-text index), e.g. 'red car'.")
@click.option(
    "--quality",
    type=click.Choice(QUALITY_CHOICES),
    help="Only captions the quality guard passed (ok: captions stored before the guard count as ok), "
    "flagged, or flagged with this flag.",
)
@click.option("--limit", type=click.IntRange(min=1), help="At most this many jobs.")
@click.option("--json", "as_json", is_flag=True, help="One JSON array with every field.")
@click.option("--jsonl", "as_jsonl", is_flag=True, help="One JSON object per line with every field.")
@click.option("--full", is_flag=True, help="Show whole captions instead of a table.")
@connection_options
def results(
    states: tuple[str, ...],
    submission_id: int | None,
    path_pattern: str | None,
    search: str | None,
    quality: str | None,
    limit: int | None,
    as_json: bool,
    as_jsonl: bool,
    full: bool,
    **params: Any,
) -> None:
    """List jobs with their captions or failure reasons.

    \b
    Examples:
      joycap-queue results --state done --path '*/cats/*'
      joycap-queue results --state failed
      joycap-queue results --submission 3 --jsonl > captions.jsonl
      joycap-queue results --search "red car" --full
      joycap-queue results --quality flagged --full         # what the quality guard flagged
    """
    settings = build_settings(params)
    engine = engines.get_engine(settings.effective_database_url)
    with Session(engine) as session:
        jobs = matching_jobs(
            session,
            states=states,
            submission_id=submission_id,
            path_pattern=path_pattern,
            search=search,
            quality=quality,
            limit=limit,
        )
    for model in sorted({job.model for job in jobs}):
        tiny_model_notice(model)
    if as_json:
        click.echo(json.dumps([job.to_record() for job in jobs], indent=2, ensure_ascii=False))
    elif as_jsonl:
        for job in jobs:
            click.echo(json.dumps(job.to_record(), ensure_ascii=False))
    elif full:
        for job in jobs:
            flags = f" [{job.quality}]" if job.quality not in (None, "ok") else ""
            # The flag after the path: "== id state path" stays what scripts read.
            click.echo(f"== {job.id} {job.status} {printable(job.path, one_line=True)}{flags}")
            click.echo(printable(job.caption if job.status == "done" else job.error))
    else:
        rows = [
            (job.id, job.status, job.path, job.caption if job.status == "done" else (job.error or ""))
            for job in jobs
        ]
        click.echo(table(("id", "state", "path", "caption / error"), rows))
        if not jobs:
            click.echo("no jobs match", err=True)


COMMANDS = [status, results]
