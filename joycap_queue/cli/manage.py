"""`retry`, `cancel` and `forget`: act on jobs already in the database."""

from __future__ import annotations

from typing import Any

import click
from click.core import ParameterSource

from joycap_queue.captions import prompts
from joycap_queue.captions.modelspec import check_adapter, check_quantize
from joycap_queue.captions.request import custom_prompts as custom_prompts_of
from joycap_queue.cli.options import (
    GENERATION_SETTINGS,
    ExtraGreedyCommand,
    build_settings,
    connection_options,
    request_of,
    request_options,
)
from joycap_queue.errors import OptionError
from joycap_queue.ops.jobcontrol import (
    JobSelection,
    RequestChanges,
    cancel_jobs,
    forget_submission,
    retry_jobs,
    submission_counts,
)
from joycap_queue.results.export import QUALITY_CHOICES
from joycap_queue.store.models import JobStatus

MAX_LISTED_CONFLICTS = 10


def selection_options(func: Any) -> Any:
    func = click.option(
        "--path", "path_pattern", help="Only paths matching this glob (* and ?), e.g. '*/cats/*'."
    )(func)
    return click.option(
        "--submission", "submission_ids", multiple=True, type=int, help="Only this submission (repeatable)."
    )(func)


def _changes(params: dict[str, Any], settings: Any) -> RequestChanges:
    """The options given on the command line; defaults and environment variables change nothing."""
    ctx = click.get_current_context()
    options = request_of(params)

    def given(name: str) -> bool:
        return ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE

    custom_prompts = custom_prompts_of(options.custom_prompt) if given("custom_prompt") else ()
    if len(custom_prompts) > 1:
        # A job is rebuilt in place, so it keeps one prompt: new prompts are a new `submit`.
        raise click.UsageError("retry takes one --prompt: it rebuilds each job in place, one prompt per job")
    prompt_file: tuple[prompts.WeightedPrompt, ...] = ()
    if given("prompt_file") and options.prompt_file is not None:
        parsed = prompts.read_prompt_file(options.prompt_file)
        if parsed.mode == "all" and len(parsed.prompts) > 1:
            raise click.UsageError(
                'retry takes a prompt file in mode "draw": it rebuilds each job in place, one prompt per job'
            )
        prompt_file = parsed.prompts
    if given("custom_prompt") and prompt_file:
        raise OptionError("prompt_file", "give either --prompt or --prompt-file, not both")
    return RequestChanges(
        caption_type=options.caption_type if given("caption_type") else None,
        length=options.length if given("length") else None,
        extra=options.extra if given("extra") else None,
        name=options.name if given("name") else None,
        custom_prompt=custom_prompts[0] if custom_prompts else None,
        prompt_file=prompt_file,
        prepend=options.prepend if given("prepend") else None,
        append=options.append if given("append") else None,
        model=settings.model if given("model") else None,
        profile=settings.profile if given("profile") else None,
        generation={name: getattr(settings, name) for name in GENERATION_SETTINGS if given(name)},
        quantize=check_quantize(settings.quantize) if given("quantize") else None,
        adapter=(check_adapter(settings.lora) if settings.lora else ("", "")) if given("lora") else None,
    )


@click.command(cls=ExtraGreedyCommand)
@selection_options
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice([JobStatus.failed.value, JobStatus.cancelled.value]),
    help="Which jobs to queue again [default: failed].",
)
@click.option(
    "--quality",
    type=click.Choice([choice for choice in QUALITY_CHOICES if choice != "ok"]),
    help="Caption again the done jobs whose caption the quality guard flagged (with this flag).",
)
@request_options
@connection_options
def retry(
    submission_ids: tuple[int, ...],
    path_pattern: str | None,
    states: tuple[str, ...],
    quality: str | None,
    **params: Any,
) -> None:
    """Queue failed jobs again, optionally with changed caption options.

    Only the options given here change; each job keeps the rest of its own. A changed prompt,
    model or generation setting makes a new request (a new dedup key) in the same row. With
    --quality, done jobs whose caption was flagged are captioned again instead.

    \b
    Examples:
      joycap-queue retry                                   # every failed job
      joycap-queue retry --submission 3 --max-new-tokens 300
      joycap-queue retry --path '*/cats/*' -t Straightforward --model ./other-checkpoint
      joycap-queue retry --submission 5 --quantize none --lora ./better-lora
      joycap-queue retry --state cancelled --submission 4  # what `cancel` put off
      joycap-queue retry --quality flagged --max-new-tokens 400   # flagged captions, longer
      joycap-queue retry --quality repetitive --temperature 0.4 --submission 3
    """
    if quality is not None and states:
        raise click.UsageError("--quality retries done jobs: leave out --state")
    settings = build_settings(params)
    changes = _changes(params, settings)
    default_states = (JobStatus.done.value,) if quality is not None else (JobStatus.failed.value,)
    summary = retry_jobs(
        settings,
        JobSelection(submission_ids, path_pattern, quality),
        states=states or default_states,
        changes=changes,
    )
    changed = "" if changes.empty else " with the new options"
    click.echo(f"queued {summary.queued} jobs again{changed}")
    for job_id, other, status in summary.conflicts[:MAX_LISTED_CONFLICTS]:
        click.echo(
            f"  job {job_id} left as it was: job {other} already has that request ({status})", err=True
        )
    if len(summary.conflicts) > MAX_LISTED_CONFLICTS:
        click.echo(f"  … and {len(summary.conflicts) - MAX_LISTED_CONFLICTS} more", err=True)


@click.command()
@selection_options
@click.option("--all", "everything", is_flag=True, help="Every queued job.")
@connection_options
def cancel(
    submission_ids: tuple[int, ...], path_pattern: str | None, everything: bool, **params: Any
) -> None:
    """Cancel queued jobs: their messages are taken off the queue and workers skip them.

    Jobs already running finish. `retry --state cancelled`, or submitting the images again,
    queues them again.

    \b
    Examples:
      joycap-queue cancel --submission 4
      joycap-queue cancel --path '*/drafts/*'
      joycap-queue cancel --all
    """
    if not (submission_ids or path_pattern or everything):
        raise click.UsageError("say which queued jobs to cancel: --submission N, --path GLOB or --all")
    settings = build_settings(params)
    summary = cancel_jobs(settings, JobSelection(submission_ids, path_pattern))
    line = f"cancelled {summary.cancelled} queued jobs"
    if summary.running:
        line += f"; {summary.running} running jobs will finish"
    click.echo(line)
    if summary.removed is None:
        click.echo("Redis unreachable: messages left in the queue; workers skip the cancelled jobs", err=True)
    elif summary.cancelled:
        click.echo(
            f"removed {summary.removed} messages from the queue, revoked {summary.revoked} held by workers",
            err=True,
        )


@click.command()
@click.option(
    "--submission", "submission_ids", multiple=True, type=int, required=True, help="The submission to forget."
)
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@connection_options
def forget(submission_ids: tuple[int, ...], yes: bool, **params: Any) -> None:
    """Delete a submission's jobs, captions included, from the database.

    Asks first. Images and sidecars on disk are left alone; queued jobs' messages are removed.

    \b
    Examples:
      joycap-queue forget --submission 3
      joycap-queue forget --submission 3 --submission 4 --yes
    """
    settings = build_settings(params)
    for submission_id in submission_ids:
        counts = submission_counts(settings, submission_id)
        described = ", ".join(f"{state} {count}" for state, count in counts.items() if count)
        total = sum(counts.values())
        if not yes:
            click.confirm(
                f"Delete submission {submission_id} and its {total} jobs ({described or 'none'}), captions included?",
                abort=True,
                err=True,
            )
        summary = forget_submission(settings, submission_id)
        click.echo(
            f"submission {submission_id}: deleted {summary.jobs} jobs and {summary.dataset_rows} dataset rows"
        )


COMMANDS = [retry, cancel, forget]
