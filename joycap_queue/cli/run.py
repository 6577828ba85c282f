"""Commands that run the model: `worker`, `caption` and `model make-tiny`.

They import the heavy side (torch, transformers) inside the command, so the rest of the CLI
starts without it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

import click

from joycap_queue import db
from joycap_queue.cli.options import (
    ExtraGreedyCommand,
    build_settings,
    caption_options,
    connection_options,
    device_options,
    generation_options,
    model_options,
    tiny_model_notice,
)
from joycap_queue.cli.output import printable, progress
from joycap_queue.config import Settings, get_settings
from joycap_queue.errors import JoycapError
from joycap_queue.images import ImageError, discover, hash_file, open_image_rgb
from joycap_queue.queue import make_celery, ping_broker
from joycap_queue.request import build_request


def export_settings(settings: Settings) -> None:
    """Put the resolved settings in the environment, where the worker's modules read them."""
    for name, value in settings.model_dump().items():
        if value is None:
            os.environ.pop(f"JOYCAP_{name.upper()}", None)
        else:
            os.environ[f"JOYCAP_{name.upper()}"] = str(value)
    get_settings.cache_clear()


def load_captioner(settings: Settings) -> Any:
    from worker.captioner import ModelLoadError
    from worker.runtime import get_captioner

    try:
        return get_captioner(settings)
    except ModelLoadError as exc:
        raise JoycapError(str(exc)) from None


@click.command()
@click.option(
    "--concurrency",
    "-c",
    type=int,
    envvar="JOYCAP_CONCURRENCY",
    show_envvar=True,
    help="Jobs in flight in this worker process, on threads sharing one model [default: 4].",
)
@click.option("--hostname", "-n", help="Celery node name [default: joycap@<host>].")
@click.option(
    "--queue", "-Q", envvar="JOYCAP_QUEUE", show_envvar=True, help="Queue to consume [default: joycap]."
)
@click.option(
    "--max-attempts",
    type=int,
    envvar="JOYCAP_MAX_ATTEMPTS",
    show_envvar=True,
    help="Give a job up as failed after this many deliveries [default: 3].",
)
@click.option(
    "--loglevel",
    "-l",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
@model_options
@device_options
@connection_options
def worker(hostname: str | None, loglevel: str, **params: Any) -> None:
    """Run a caption worker: one model in this process, several jobs in flight on threads.

    Loads the model before taking jobs; stop it with Ctrl-C (jobs in flight finish or go back to
    the queue).

    \b
    Examples:
      joycap-queue worker
      JOYCAP_MODEL=fancyfeast/llama-joycaption-beta-one-hf-llava joycap-queue worker -c 8
      joycap-queue worker --model ./tiny-model --device cpu
    """
    settings = build_settings(params)
    tiny_model_notice(settings.model)
    db.get_engine(settings.effective_database_url)
    ping_broker(make_celery(settings))
    export_settings(settings)
    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    captioner = load_captioner(settings)
    click.echo(f"model {settings.model} loaded on {captioner.device}", err=True)
    from worker.app import app

    app.worker_main(
        [
            "worker",
            "--pool=threads",
            f"--concurrency={settings.concurrency}",
            f"--queues={settings.queue}",
            f"--hostname={hostname or 'joycap@' + socket.gethostname()}",
            f"--loglevel={loglevel}",
            "--task-events",
            "--without-mingle",
            "--without-gossip",
        ]
    )


@click.command(cls=ExtraGreedyCommand)
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--batch-size",
    "-b",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Images per generate call.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image.")
@caption_options
@generation_options
@model_options
@device_options
def caption(images: tuple[Path, ...], batch_size: int, as_json: bool, **params: Any) -> None:
    """Caption images right here, without the queue or the database (upstream's example as a command).

    \b
    Examples:
      joycap-queue caption photo.jpg
      joycap-queue caption photos/ -b 8 -t Straightforward --json > captions.jsonl
    """
    settings = build_settings(params)
    request = build_request(settings, params)
    tiny_model_notice(settings.model)
    from joycap_queue.prompts import system_prompt
    from worker.captioner import CaptionInput, GenerationParams

    captioner = load_captioner(settings)
    gen = GenerationParams(**request.gen_params)
    files = [found.path for found in discover(images) if found.is_image]
    failures = 0
    with progress(len(files), "captioning") as bar:
        for start in range(0, len(files), batch_size):
            inputs, names = [], []
            for path in files[start : start + batch_size]:
                try:
                    image = open_image_rgb(path, max_pixels=settings.max_image_pixels)
                    content_hash, _ = hash_file(path)
                except (ImageError, OSError) as exc:
                    failures += 1
                    click.echo(f"\n{path}: {exc}", err=True)
                    continue
                prompt = request.prompt_for(content_hash)
                inputs.append(
                    CaptionInput(image=image, prompt=prompt, system_prompt=system_prompt(request.profile))
                )
                names.append(path)
            for path, item, output in zip(names, inputs, captioner.caption(inputs, gen), strict=True):
                text = request.prepend + output.caption + request.append
                if as_json:
                    record = {"path": str(path), "prompt": item.prompt, "caption": text}
                    click.echo(json.dumps(record, ensure_ascii=False))
                else:
                    click.echo(f"{printable(str(path), one_line=True)}: {printable(text)}")
            bar.update(len(files[start : start + batch_size]))
    if failures:
        raise JoycapError(f"{failures} of {len(files)} images could not be read")


@click.group()
def model() -> None:
    """Model utilities.

    \b
    Example:
      joycap-queue model make-tiny ./tiny-model
    """


@model.command("make-tiny")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--profile", type=click.Choice(["alpha-two", "beta-one"]), default="beta-one", show_default=True
)
def make_tiny(directory: Path, seed: int, profile: str) -> None:
    """Build a tiny random-weight JoyCaption-shaped model offline, for tests and the demo.

    Same classes and config keys as JoyCaption (LLaVA: SigLIP 384 px vision tower, Llama text
    model, 729 image tokens), a few MB, built in seconds. Its captions are random text.

    \b
    Example:
      joycap-queue model make-tiny ./tiny-model && JOYCAP_MODEL=./tiny-model joycap-queue worker
    """
    from worker.tiny import build_tiny_model

    out = build_tiny_model(directory, seed=seed, profile=profile)
    click.echo(str(Path(out).resolve()))
    tiny_model_notice(str(out))


COMMANDS = [worker, caption, model]
