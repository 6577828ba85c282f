"""Starting a worker process: the settings in the environment, the model loaded, Celery running.

`joycap-queue worker` and `caption` (cli/run.py) parse their options and call here. Nothing
heavy is imported at module level: `worker --gpus` only supervises (worker/gpus.py) and must
never import torch, so the model stack is imported inside the functions that load it.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from joycap_queue.captions.request import CaptionRequest
from joycap_queue.config import Settings, get_settings, settings_environment
from joycap_queue.errors import JoycapError, first_line
from joycap_queue.intake.images import ImageError, hash_file, open_image_rgb
from joycap_queue.messaging.app import make_celery, model_queue, ping_broker
from joycap_queue.recovery.liveness import WorkerHeartbeat
from joycap_queue.recovery.requeue import requeue_lost
from joycap_queue.store import engines

GENERATE_SWITCH_INTERVAL_S = 0.0005


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


def with_default_threads(settings: Settings) -> Settings:
    if settings.torch_threads:
        return settings
    # The generate thread gets all cores but one: on a CPU, torch's spinning intra-op threads
    # on every core starve the task threads that decode and prepare the next batch (measured:
    # 2 threads on 2 cores ran the tiny model's queue at 0.6x the speed of 1 thread).
    return settings.model_copy(update={"torch_threads": max(1, (os.cpu_count() or 2) - 1)})


def prepare_worker(settings: Settings, loglevel: str) -> None:
    """Check the database and Redis, send again what Redis lost, and export the settings."""
    engines.get_engine(settings.effective_database_url)
    ping_broker(make_celery(settings))
    # Redis may have lost messages while no worker ran: the database says what is still owed.
    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    requeue_lost(settings)
    export_settings(settings)


def run_per_gpu(settings: Settings, *, hostname: str | None, loglevel: str) -> int:
    # This process only supervises: it never imports torch, so no CUDA state can leak into the
    # children, which are fresh interpreters (spawned, not forked).
    from worker.gpus import run_per_gpu as supervise

    return supervise(settings, hostname=hostname, loglevel=loglevel)


def run_worker(
    settings: Settings, *, hostname: str | None, loglevel: str, say: Callable[[str], None]
) -> None:
    """Load the model, then consume its queue until Celery stops; ``say`` gets the loaded line."""
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
    say(
        f"model {settings.model} loaded: {stream.describe()}, {settings.effective_concurrency} jobs in flight"
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


@dataclass(frozen=True)
class Captioned:
    path: Path
    number: int  # which of the prompts, from 1
    prompt: str
    text: str  # prepend, caption, append


class LocalCaptioner:
    """`caption`: the worker's own captioning path in this process, without queue or database."""

    def __init__(self, settings: Settings, requests: Sequence[CaptionRequest]) -> None:
        from worker.model.captioner import GenerationParams

        self.settings = settings
        self.requests = list(requests)
        captioner = load_captioner(settings)
        self.caption_batch = _batch_captioner(settings, captioner)
        # What the prompts share: profile, generation, prepend, append.
        self.gen = GenerationParams(**self.requests[0].gen_params)

    def batch_size(self, asked: int) -> int:
        if self.settings.uses_engine:
            # The continuous engine keeps at least its slots' worth in flight.
            return max(asked, self.settings.batch_size or 16)
        return asked

    def batches(
        self, files: Sequence[Path], batch_size: int, *, unreadable: Callable[[Path, Exception], None]
    ) -> Iterator[tuple[list[Captioned], int]]:
        """Per batch of files: every image's caption with every prompt, and the files it took."""
        from joycap_queue.captions.prompts import system_prompt
        from worker.model.captioner import CaptionInput

        first = self.requests[0]
        for start in range(0, len(files), batch_size):
            inputs, names = [], []
            chunk = files[start : start + batch_size]
            for path in chunk:
                try:
                    image = open_image_rgb(path, max_pixels=self.settings.max_image_pixels)
                    content_hash, _ = hash_file(path)
                except (ImageError, OSError) as exc:
                    unreadable(path, exc)
                    continue
                # Every image with every prompt: one caption (one output line) per image and prompt.
                for number, each in enumerate(self.requests, start=1):
                    prompt = each.prompt_for(content_hash)
                    inputs.append(
                        CaptionInput(image=image, prompt=prompt, system_prompt=system_prompt(each.profile))
                    )
                    names.append((path, number))
            outputs = self.caption_batch(inputs, self.gen)
            done = [
                Captioned(path, number, item.prompt, first.prepend + output.caption + first.append)
                for (path, number), item, output in zip(names, inputs, outputs, strict=True)
            ]
            yield done, len(chunk)


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
