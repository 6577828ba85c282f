"""`flower` and `up`: monitoring, and the whole service on one machine with one command.

The work is in `ops.flower` and `ops.up`; these commands parse the options and print.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from joycap_queue.cli.options import (
    ExtraGreedyCommand,
    build_settings,
    connection_options,
    intake_options,
    request_of,
    tiny_model_notice,
)
from joycap_queue.ops.flower import serve_flower
from joycap_queue.ops.up import run_up


def flower_options(func: Any) -> Any:
    func = click.option(
        "--no-auth", is_flag=True, help="Serve Flower without basic auth: allowed on localhost only."
    )(func)
    func = click.option(
        "--address",
        default="127.0.0.1",
        show_default=True,
        envvar="JOYCAP_FLOWER_ADDRESS",
        help="Listen here.",
    )(func)
    func = click.option(
        "--port", type=click.IntRange(1, 65535), default=5555, show_default=True, envvar="JOYCAP_FLOWER_PORT"
    )(func)
    return func


def _say_err(line: str) -> None:
    click.echo(line, err=True)


@click.command()
@flower_options
@connection_options
def flower(port: int, address: str, no_auth: bool, **params: Any) -> None:
    """Start Flower on the queue: live workers, every image's task, and Prometheus /metrics.

    Basic auth comes from JOYCAP_FLOWER_USER and JOYCAP_FLOWER_PASSWORD; without them Flower
    refuses to start unless --no-auth, which serves it on localhost only.

    \b
    Examples:
      JOYCAP_FLOWER_USER=me JOYCAP_FLOWER_PASSWORD=... joycap-queue flower --address 0.0.0.0
      joycap-queue flower --no-auth            # http://127.0.0.1:5555, this machine only
    """
    auth = "no auth, localhost only" if no_auth else "basic auth"
    serve_flower(
        build_settings(params),
        port=port,
        address=address,
        no_auth=no_auth,
        on_started=lambda url: click.echo(f"Flower at {url} ({auth}); metrics at {url}/metrics"),
        on_stopping=lambda: _say_err("stopping Flower"),
    )


@click.command(cls=ExtraGreedyCommand)
@click.argument("inbox", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--no-flower", is_flag=True, help="Do not start Flower.")
@click.option("--polling", is_flag=True, help="Poll the inbox (NFS, SMB, Docker Desktop mounts).")
@flower_options
@intake_options(default_sidecar=("txt",))
def up(
    inbox: Path, no_flower: bool, polling: bool, port: int, address: str, no_auth: bool, **params: Any
) -> None:
    """Run everything on this machine: Redis if none is reachable, workers, a watcher on INBOX, Flower.

    One worker per GPU (or one CPU worker), the inbox watched with the caption options given, and
    Flower (basic auth from JOYCAP_FLOWER_USER/PASSWORD, else localhost only). Ctrl-C stops
    everything it started.

    \b
    Examples:
      joycap-queue up ~/inbox
      JOYCAP_MODEL=fancyfeast/llama-joycaption-beta-one-hf-llava joycap-queue up ~/inbox -t Straightforward
    """
    settings = build_settings(params)
    tiny_model_notice(settings.model)
    options = request_of(params)
    run_up(
        inbox,
        settings,
        replace(options, sidecar=options.sidecar or ("txt",)),
        flower=not no_flower,
        polling=polling,
        port=port,
        address=address,
        no_auth=no_auth,
        say=click.echo,
        say_err=_say_err,
    )


COMMANDS = [flower, up]
