"""Idle unload: a worker that has had no job for a while frees its model, and loads it again on demand.

For a GPU shared between captioning and training: a worker left running between runs would
otherwise hold 17 GB of weights and its KV cache for nothing. The worker process, its Celery
consumer and its heartbeat stay up; only the model and the caption stream go, so Flower and
`status` see a live worker whose state is ``idle-unloaded``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from worker.backends.base import Backend, BackendFront, CaptionInput, CaptionOutput, GenerationParams

log = logging.getLogger(__name__)

LOADED = "loaded"
LOADING = "loading"
UNLOADED = "idle-unloaded"


class IdleUnloading(BackendFront):
    """The process's caption stream, built by ``build`` and dropped after ``idle_s`` without jobs.

    Task threads call ``caption_one`` as on any stream; the first one after an unload loads the
    model again (the others wait for it), so no job fails or waits for anything but the load.
    """

    def __init__(self, build: Callable[[], Any], backend: Backend, idle_s: float) -> None:
        self.build = build
        self.backend = backend
        self.idle_s = idle_s
        self.state = LOADING
        self.unloads = 0
        self._stream: Any = None
        self._describe = ""
        self._max_batch_size = 0
        self._time_limit_s: float | None = None
        self._in_flight = 0
        self._last_active = time.monotonic()
        self._lock = threading.Lock()
        self._monitor: threading.Thread | None = None

    @property
    def max_batch_size(self) -> int:
        return self._max_batch_size

    def describe(self) -> str:
        return f"{self._describe}; unloaded after {self.idle_s:g} s idle"

    def start(self) -> IdleUnloading:
        """Build the stream the first time (the worker reports ready after it); later calls return."""
        with self._lock:
            if self._monitor is None:
                self._load()
                self._monitor = threading.Thread(target=self._watch, name="joycap-idle", daemon=True)
                self._monitor.start()
        return self

    def enforce_time_limit(self, limit_s: float) -> None:
        self._time_limit_s = limit_s
        with self._lock:
            if self._stream is not None:
                self._stream.enforce_time_limit(limit_s)

    def caption_one(self, item: CaptionInput, params: GenerationParams) -> CaptionOutput:
        with self._lock:
            self._in_flight += 1
            try:
                stream = self._stream if self._stream is not None else self._load()
            except BaseException:
                self._in_flight -= 1
                raise
        try:
            return stream.caption_one(item, params)
        finally:
            with self._lock:
                self._in_flight -= 1
                self._last_active = time.monotonic()

    def hand_back(self) -> int:
        with self._lock:
            stream = self._stream
        return stream.hand_back() if stream is not None else 0

    def _load(self) -> Any:
        # Under the lock: the task threads that came meanwhile wait for this one load.
        self.state = LOADING
        started = time.monotonic()
        stream = self.build()
        if self._time_limit_s is not None:
            stream.enforce_time_limit(self._time_limit_s)
        self._stream, self.state = stream, LOADED
        self._describe, self._max_batch_size = stream.describe(), stream.max_batch_size
        self._last_active = time.monotonic()
        if self.unloads:
            log.info("model loaded again for a new job in %.1f s", time.monotonic() - started)
        return stream

    def _watch(self) -> None:
        interval = min(1.0, max(0.05, self.idle_s / 4))
        while True:
            time.sleep(interval)
            with self._lock:
                idle = time.monotonic() - self._last_active
                if self._stream is None or self._in_flight or idle < self.idle_s:
                    continue
                self._unload(idle)

    def _unload(self, idle: float) -> None:
        stream, self._stream = self._stream, None
        # Nothing is in flight, so the stream's threads end at once; then nothing but the
        # backend holds the model, and its unload gives the memory back.
        stream.close()
        del stream
        unload = getattr(self.backend, "unload", None)
        if unload is not None:
            unload()
        self.state = UNLOADED
        self.unloads += 1
        log.info("no job for %.0f s: model unloaded; the next job loads it again", idle)


def model_state(stream: Any) -> str:
    """What `status` and Flower show for this worker's model."""
    return str(getattr(stream, "state", LOADED))


def model_info_step(stream: Any) -> type:
    """A Celery worker bootstep whose ``info`` adds the model and its state to ``inspect stats``:
    Flower shows it on the worker's page (the "Other" tab), beside the worker being online."""
    from celery import bootsteps

    class ModelInfo(bootsteps.StartStopStep):
        def info(self, worker: Any) -> dict[str, Any]:
            return {"joycap": {"model": stream.serving_key, "state": model_state(stream)}}

    return ModelInfo
