"""`watch`: captions for every image dropped into an inbox."""

from __future__ import annotations

import logging
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from joycap_queue.cli.options import (
    ExtraGreedyCommand,
    build_settings,
    intake_options,
    request_of,
    tiny_model_notice,
)
from joycap_queue.intake.watch.config import WatchConfig, inbox_config, load_watch_config
from joycap_queue.intake.watch.watcher import FolderWatcher


@click.command(cls=ExtraGreedyCommand)
@click.argument("inboxes", nargs=-1, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="TOML file listing inboxes, each with its own caption options (see docs/watch.md).",
)
@click.option(
    "--settle-seconds",
    type=click.FloatRange(min=0),
    envvar="JOYCAP_SETTLE_SECONDS",
    help="A file without a close event is taken once its size and mtime held still this long [default: 2].",
)
@click.option(
    "--rescan-seconds",
    type=click.FloatRange(min=1),
    envvar="JOYCAP_RESCAN_SECONDS",
    help="Rescan the inboxes this often, for events the kernel dropped [default: 60].",
)
@click.option(
    "--polling",
    is_flag=True,
    default=None,
    envvar="JOYCAP_POLLING",
    help="Poll instead of inotify: needed on NFS, SMB and Docker Desktop bind mounts.",
)
@click.option(
    "--incomplete-after",
    type=click.FloatRange(min=1),
    envvar="JOYCAP_INCOMPLETE_AFTER",
    help="A file that does not decode and has not changed for this long is queued anyway, to fail "
    "with its reason (a broken file, not a slow writer) [default: 600].",
)
@intake_options(default_sidecar=("txt",))
def watch(
    inboxes: tuple[Path, ...],
    config_path: Path | None,
    settle_seconds: float | None,
    rescan_seconds: float | None,
    polling: bool | None,
    incomplete_after: float | None,
    **params: Any,
) -> None:
    """Watch inbox folders and caption every finished image dropped into them.

    Images already in an inbox are queued at start; a restart queues nothing twice. By default
    each image gets an image.txt sidecar when it is done. One watcher per inbox: a second one
    exits with an error.

    \b
    Examples:
      joycap-queue watch ~/inbox
      joycap-queue watch ~/inbox -t "Booru-like tag list" --sidecar txt --sidecar json --move
      joycap-queue watch --config watch.toml --polling
      joycap-queue watch ~/inbox -p "Describe the lighting." -p "List the objects."   # 2 jobs per image
    """
    if not inboxes and config_path is None:
        raise click.UsageError("give at least one INBOX folder or --config FILE")
    settings = build_settings(params)
    tiny_model_notice(settings.model)
    config = load_watch_config(config_path, settings) if config_path else WatchConfig()
    options = request_of(params)
    options = replace(options, sidecar=options.sidecar or ("txt",))
    config.inboxes.extend(inbox_config(inbox, settings, options) for inbox in inboxes)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    watcher = FolderWatcher(
        config.inboxes,
        settings,
        settle_seconds=settle_seconds if settle_seconds is not None else config.settle_seconds or 2.0,
        rescan_seconds=rescan_seconds if rescan_seconds is not None else config.rescan_seconds or 60.0,
        polling=bool(polling if polling is not None else config.polling),
        incomplete_after=incomplete_after or config.incomplete_after_seconds or 600.0,
    )
    signal.signal(signal.SIGTERM, lambda *_: watcher.stop())
    # Inherited as ignored when started in the background by a shell; Ctrl-C must still work.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    mode = "polling" if watcher.polling else "inotify"
    for inbox in config.inboxes:
        prompts = f", {len(inbox.requests)} prompts" if len(inbox.requests) > 1 else ""
        click.echo(f"watching {inbox.path} ({mode}{prompts})", err=True)
    try:
        watcher.run()
    except KeyboardInterrupt:
        watcher.close()
    click.echo("watcher stopped", err=True)


COMMANDS = [watch]
