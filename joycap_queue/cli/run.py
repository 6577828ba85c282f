"""Commands that run the model: `worker` and `caption`.

They parse their options and call worker/bootstrap.py, imported inside the command, so the rest
of the CLI starts without the heavy side (torch, transformers).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from joycap_queue.captions.request import build_requests
from joycap_queue.cli.options import (
    ExtraGreedyCommand,
    bad_setting,
    build_settings,
    connection_options,
    device_options,
    model_options,
    request_of,
    request_options,
    tiny_model_notice,
    variant_options,
)
from joycap_queue.cli.output import printable, progress
from joycap_queue.config import Settings
from joycap_queue.errors import JoycapError
from joycap_queue.intake.images import discover

WORKER_SETTINGS = (
    "backend",
    "engine",
    "batch_size",
    "batch_wait_ms",
    "kv_memory_fraction",
    "gpus",
    "openai_url",
    "shutdown_grace_s",
    "idle_unload_s",
    "quality_retries",
)


def with_worker_options(settings: Settings, params: dict[str, Any]) -> Settings:
    """The settings with the worker's own options laid over them, validated; one line if invalid."""
    given = {name: params[name] for name in WORKER_SETTINGS if params.get(name) is not None}
    if not given:
        return settings
    try:
        return Settings(**{**settings.model_dump(), **given})
    except ValidationError as exc:
        raise bad_setting(exc) from None


engine_option = click.option(
    "--engine",
    envvar="JOYCAP_ENGINE",
    show_envvar=True,
    type=click.Choice(["continuous", "generate"]),
    help="transformers backend: continuous (default: one KV cache, slots refilled at once, CUDA "
    "graphs) or generate (transformers' generate on merged batches).",
)


@click.command()
@click.option(
    "--backend",
    envvar="JOYCAP_BACKEND",
    show_envvar=True,
    type=click.Choice(["transformers", "vllm", "openai", "null"]),
    help="transformers (default); vllm (in-process engine, the [vllm] extra); openai (send each image "
    "to an OpenAI-compatible server at --openai-url); null (no model: a fixed caption, for measuring "
    "the queue itself).",
)
@engine_option
@click.option(
    "--batch-size",
    "-b",
    envvar="JOYCAP_BATCH_SIZE",
    show_envvar=True,
    help="Images in flight (continuous engine) or per generate call; 'auto' (default): as many as "
    "the KV cache fits in --kv-memory-fraction of the GPU (16 on a CPU; 8 with --engine generate).",
)
@click.option(
    "--kv-memory-fraction",
    type=float,
    envvar="JOYCAP_KV_MEMORY_FRACTION",
    show_envvar=True,
    help="Share of the GPU's memory the model and the KV cache may take, for -b auto [default: 0.9].",
)
@click.option(
    "--batch-wait-ms",
    type=float,
    envvar="JOYCAP_BATCH_WAIT_MS",
    show_envvar=True,
    help="Longest wait for a batch to fill before it runs anyway [default: 50].",
)
@click.option(
    "--concurrency",
    "-c",
    type=int,
    envvar="JOYCAP_CONCURRENCY",
    show_envvar=True,
    help="Jobs in flight in this worker process, on threads sharing one model; for the openai "
    "backend, requests in flight [default: twice the batch size].",
)
@click.option(
    "--gpus",
    envvar="JOYCAP_GPUS",
    show_envvar=True,
    help="One worker process per GPU, each with its own model: 'all' or indices like 0,1,3.",
)
@click.option(
    "--openai-url",
    envvar="JOYCAP_OPENAI_URL",
    show_envvar=True,
    help="Base URL of the OpenAI-compatible server for --backend openai, e.g. http://gpu-box:8000/v1 "
    "(its key, if any, only from JOYCAP_OPENAI_API_KEY).",
)
@click.option("--hostname", "-n", help="Celery node name [default: joycap@<host>; gpuN@<host> per GPU].")
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
    "--shutdown-grace",
    "shutdown_grace_s",
    type=float,
    envvar="JOYCAP_SHUTDOWN_GRACE_S",
    show_envvar=True,
    help="Seconds a SIGTERM gives jobs in flight to finish before they go back to the queue [default: 60].",
)
@click.option(
    "--loglevel",
    "-l",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
@click.option(
    "--quality-retries",
    type=click.IntRange(0, 10),
    envvar="JOYCAP_QUALITY_RETRIES",
    show_envvar=True,
    help="Caption a caption flagged truncated, repetitive, empty, junk or duplicate-tags again, "
    "with a fresh sample, up to this many times; the best attempt is kept [default: 2; 0: off].",
)
@click.option(
    "--idle-unload-s",
    type=click.FloatRange(min=0),
    envvar="JOYCAP_IDLE_UNLOAD_S",
    show_envvar=True,
    help="Free the model (and the GPU's memory) after this many seconds without jobs, and load it "
    "again when the next one comes; for a GPU shared with training [default: 0, never].",
)
@model_options
@variant_options
@device_options
@connection_options
def worker(hostname: str | None, loglevel: str, **params: Any) -> None:
    """Run a caption worker: one model in this process, several jobs in flight on threads.

    Loads the model before taking jobs; stop it with Ctrl-C or SIGTERM (jobs in flight get
    --shutdown-grace seconds to finish, then go back to the queue).

    \b
    Examples:
      joycap-queue worker
      JOYCAP_MODEL=fancyfeast/llama-joycaption-beta-one-hf-llava joycap-queue worker -c 8
      joycap-queue worker --model ./tiny-model --device cpu
      joycap-queue worker --gpus all -b auto
      joycap-queue worker --engine generate -b 16
      joycap-queue worker --quantize nf4 --lora ./my-lora --idle-unload-s 600
      joycap-queue worker --backend openai --openai-url http://127.0.0.1:8000/v1 -c 32
    """
    from worker import bootstrap

    settings = bootstrap.with_default_threads(with_worker_options(build_settings(params), params))
    tiny_model_notice(settings.model)
    bootstrap.prepare_worker(settings, loglevel)
    if settings.gpus:
        raise SystemExit(bootstrap.run_per_gpu(settings, hostname=hostname, loglevel=loglevel))
    if settings.backend == "null":
        warning = "warning: null backend: no model runs, every caption is a fixed placeholder"
        click.secho(f"{warning} (for measuring the queue's own cost)", fg="yellow", err=True)
    bootstrap.run_worker(
        settings, hostname=hostname, loglevel=loglevel, say=lambda line: click.echo(line, err=True)
    )


@click.command(cls=ExtraGreedyCommand)
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--batch-size",
    "-b",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Images read and captioned together: per generate call with --engine generate; the "
    "continuous engine keeps at least its slots' worth in flight.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image.")
@engine_option
@request_options
@device_options
def caption(images: tuple[Path, ...], batch_size: int, as_json: bool, **params: Any) -> None:
    """Caption images right here, without the queue or the database (upstream's example as a command).

    \b
    Examples:
      joycap-queue caption photo.jpg
      joycap-queue caption photos/ -b 8 -t Straightforward --json > captions.jsonl
      joycap-queue caption photo.jpg --quantize nf4 --lora ./my-lora
      joycap-queue caption photo.jpg -p "Describe the lighting." -p "List the objects."
    """
    # One command, one run: idle unload is the worker's alone.
    settings = with_worker_options(build_settings(params), params).model_copy(update={"idle_unload_s": 0})
    requests = build_requests(settings, request_of(params))
    tiny_model_notice(settings.model)
    from worker.bootstrap import LocalCaptioner

    captioner = LocalCaptioner(settings, requests)
    batch_size = captioner.batch_size(batch_size)
    files = [found.path for found in discover(images) if found.is_image]
    failures = 0

    def unreadable(path: Path, exc: Exception) -> None:
        nonlocal failures
        failures += 1
        click.echo(f"\n{path}: {exc}", err=True)

    with progress(len(files), "captioning") as bar:
        for captioned, taken in captioner.batches(files, batch_size, unreadable=unreadable):
            for each in captioned:
                if as_json:
                    record = {"path": str(each.path), "prompt": each.prompt, "caption": each.text}
                    click.echo(json.dumps(record, ensure_ascii=False))
                else:
                    label = printable(str(each.path), one_line=True) + (
                        f" (prompt {each.number})" if len(requests) > 1 else ""
                    )
                    click.echo(f"{label}: {printable(each.text)}")
            bar.update(taken)
    if failures:
        raise JoycapError(f"{failures} of {len(files)} images could not be read")


COMMANDS = [worker, caption]
