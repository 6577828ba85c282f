"""Commands that run the model: `worker` and `caption`.

They import the heavy side (torch, transformers) inside the command, so the rest of the CLI
starts without it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from joycap_queue.captions.request import build_requests
from joycap_queue.cli.options import (
    ExtraGreedyCommand,
    bad_setting,
    build_settings,
    caption_options,
    connection_options,
    device_options,
    generation_options,
    model_options,
    tiny_model_notice,
    variant_options,
)
from joycap_queue.cli.output import printable, progress
from joycap_queue.config import Settings, get_settings, settings_environment
from joycap_queue.errors import JoycapError, first_line
from joycap_queue.intake.images import ImageError, discover, hash_file, open_image_rgb
from joycap_queue.messaging.app import make_celery, model_queue, ping_broker
from joycap_queue.recovery.liveness import WorkerHeartbeat
from joycap_queue.recovery.requeue import requeue_lost
from joycap_queue.store import engines


def export_settings(settings: Settings) -> None:
    """Put the resolved settings in the environment, where the worker's modules read them."""
    environment = settings_environment(settings)
    for name in Settings.model_fields:
        os.environ.pop(f"JOYCAP_{name.upper()}", None)
    # A secret travels to this process's modules and children only, never to any output.
    os.environ.update(environment)
    get_settings.cache_clear()


def load_captioner(settings: Settings) -> Any:
    from worker.backends import ModelLoadError
    from worker.runtime import get_captioner

    try:
        return get_captioner(settings)
    except ModelLoadError as exc:
        raise JoycapError(str(exc)) from None


def load_stream(settings: Settings) -> Any:
    """The worker's stream over its loaded model, started; a model that will not load or a KV
    cache that does not fit (MemoryError: lower JOYCAP_KV_MEMORY_FRACTION) is one line."""
    from worker.backends import ModelLoadError
    from worker.runtime import get_batcher

    try:
        return get_batcher(settings)
    except (ModelLoadError, MemoryError) as exc:
        raise JoycapError(str(exc)) from None


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
GENERATE_SWITCH_INTERVAL_S = 0.0005


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
    settings = with_worker_options(build_settings(params), params)
    if not settings.torch_threads:
        # The generate thread gets all cores but one: on a CPU, torch's spinning intra-op threads
        # on every core starve the task threads that decode and prepare the next batch (measured:
        # 2 threads on 2 cores ran the tiny model's queue at 0.6x the speed of 1 thread).
        settings = settings.model_copy(update={"torch_threads": max(1, (os.cpu_count() or 2) - 1)})
    tiny_model_notice(settings.model)
    engines.get_engine(settings.effective_database_url)
    ping_broker(make_celery(settings))
    # Redis may have lost messages while no worker ran: the database says what is still owed.
    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    requeue_lost(settings)
    export_settings(settings)
    if settings.gpus:
        # This process only supervises: it never imports torch, so no CUDA state can leak into
        # the children, which are fresh interpreters (spawned, not forked).
        from worker.gpus import run_per_gpu

        raise SystemExit(run_per_gpu(settings, hostname=hostname, loglevel=loglevel))
    if settings.backend == "null":
        warning = "warning: null backend: no model runs, every caption is a fixed placeholder"
        click.secho(f"{warning} (for measuring the queue's own cost)", fg="yellow", err=True)
    from worker.runtime import install_shutdown_grace
    from worker.transport import install_redis_shortcuts

    stream = load_stream(settings)
    # Celery's threads pool enforces no time limit: the stream does (a late caption fails; a
    # model call far past it ends the process, and the others take its jobs).
    stream.enforce_time_limit(settings.task_time_limit_s)
    # -b auto is resolved now, by the engine's memory arithmetic: size the thread pool from it.
    settings = settings.model_copy(update={"batch_size": stream.max_batch_size})
    install_shutdown_grace(settings.shutdown_grace_s)
    install_redis_shortcuts()
    # The model thread must get the GIL back at once after each torch op: at the default 5 ms,
    # task threads holding it slowed each batch by about 12% (bench/batching.py, tiny model).
    sys.setswitchinterval(GENERATE_SWITCH_INTERVAL_S)
    click.echo(
        f"model {settings.model} loaded: {stream.describe()}, {settings.effective_concurrency} jobs in flight",
        err=True,
    )
    from celery.signals import celeryd_after_setup

    from worker.app import app
    from worker.idle import model_info_step, model_state

    app.steps["worker"].add(model_info_step(stream))
    heartbeats: list[WorkerHeartbeat] = []

    def register(sender: str, **_: Any) -> None:
        # Under the node name Celery settled on (%h expanded): the name its jobs are claimed by.
        heartbeats.append(WorkerHeartbeat(settings, sender, state=lambda: model_state(stream)).start())

    celeryd_after_setup.connect(register, weak=False)
    try:
        _run_celery_worker(app, settings, stream.serving_key, hostname, loglevel)
    finally:
        for heartbeat in heartbeats:
            heartbeat.stop()


def _run_celery_worker(
    app: Any, settings: Settings, serving: str, hostname: str | None, loglevel: str
) -> None:
    app.worker_main(
        [
            "worker",
            "--pool=threads",
            f"--concurrency={settings.effective_concurrency}",
            # Its model's queue (model, quantization and adapter: ModelSpec.key), and the shared
            # one (messages sent before jobs were routed by model).
            f"--queues={model_queue(settings.queue, serving)},{settings.queue}",
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
    help="Images read and captioned together: per generate call with --engine generate; the "
    "continuous engine keeps at least its slots' worth in flight.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image.")
@engine_option
@caption_options
@generation_options
@model_options
@variant_options
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
    requests = build_requests(settings, params)
    request = requests[0]  # what the prompts share: profile, generation, prepend, append
    tiny_model_notice(settings.model)
    from joycap_queue.captions.prompts import system_prompt
    from worker.model.captioner import CaptionInput, GenerationParams

    captioner = load_captioner(settings)
    caption_batch = _batch_captioner(settings, captioner)
    if settings.uses_engine:
        batch_size = max(batch_size, settings.batch_size or 16)
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
                # Every image with every prompt: one caption (one output line) per image and prompt.
                for number, each in enumerate(requests, start=1):
                    prompt = each.prompt_for(content_hash)
                    inputs.append(
                        CaptionInput(image=image, prompt=prompt, system_prompt=system_prompt(each.profile))
                    )
                    names.append((path, number))
            for (path, number), item, output in zip(names, inputs, caption_batch(inputs, gen), strict=True):
                text = request.prepend + output.caption + request.append
                if as_json:
                    record = {"path": str(path), "prompt": item.prompt, "caption": text}
                    click.echo(json.dumps(record, ensure_ascii=False))
                else:
                    label = printable(str(path), one_line=True) + (
                        f" (prompt {number})" if len(requests) > 1 else ""
                    )
                    click.echo(f"{label}: {printable(text)}")
            bar.update(len(files[start : start + batch_size]))
    if failures:
        raise JoycapError(f"{failures} of {len(files)} images could not be read")


def _batch_captioner(settings: Settings, captioner: Any) -> Any:
    """``caption(inputs, params)`` through the worker's own path; a failure is one line."""
    stream = load_stream(settings) if settings.uses_engine else None

    def caption_batch(inputs: list[Any], params: Any) -> list[Any]:
        try:
            if stream is None:
                return list(captioner.caption(inputs, params))
            futures = [stream.submit(captioner.prepare(item), params) for item in inputs]
            return [future.result() for future in futures]
        except Exception as exc:  # noqa: BLE001 - the model failed: say so, no traceback
            raise JoycapError(f"captioning failed: {type(exc).__name__}: {first_line(exc)}") from None

    return caption_batch


COMMANDS = [worker, caption]
