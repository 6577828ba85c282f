"""This worker process's one backend and one batcher, built lazily inside the process that uses them.

Celery's threads pool runs every task of a worker in this process, so its task threads share
one model through one batcher. Neither is built in a parent that forks: CUDA does not survive
a fork.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, Union

from joycap_queue.config import Settings, get_settings
from worker.backends import Backend, make_backend
from worker.batcher import Batcher
from worker.gate import Gate

if TYPE_CHECKING:
    from worker.engine.continuous import ContinuousEngine
    from worker.idle import IdleUnloading

# What task threads hand images to: the continuous engine, or the batcher over any backend (or
# either behind idle unloading).
CaptionStream = Union[Batcher, "ContinuousEngine", "IdleUnloading"]

log = logging.getLogger(__name__)
_lock = threading.Lock()
_backend: Backend | None = None
_batcher: CaptionStream | None = None
# One per process: the task threads pass it to be in flight together, or one suspect alone.
_gate = Gate()


def get_backend(settings: Settings | None = None) -> Backend:
    """The process's backend, loaded on first use (the worker command loads it before serving)."""
    global _backend
    with _lock:
        if _backend is None:
            _backend = make_backend(settings or get_settings())
        backend = _backend
    backend.load()
    return backend


# The `caption` command's name for it: the same model the worker's jobs use.
get_captioner = get_backend


def get_batcher(settings: Settings | None = None) -> CaptionStream:
    """The process's caption stream over its backend, started (the engine warmed up and captured).

    With ``idle_unload_s``, a stream that frees the model when idle (worker/idle.py); the backend
    is then loaded by that stream alone, not again here on every call.
    """
    global _batcher
    with _lock:
        batcher = _batcher
    if batcher is None:
        settings = settings or get_settings()
        backend = get_backend(settings)
        with _lock:
            if _batcher is None and settings.idle_unload_s > 0:
                from worker.idle import IdleUnloading

                _batcher = IdleUnloading(
                    lambda: _make_stream(settings, backend).start(), backend, settings.idle_unload_s
                )
            elif _batcher is None:
                _batcher = _make_stream(settings, backend)
            batcher = _batcher
    return batcher.start()


def _make_stream(settings: Settings, backend: Backend) -> CaptionStream:
    if settings.uses_engine:
        from worker.engine.continuous import ContinuousEngine
        from worker.model.captioner import Captioner

        assert isinstance(backend, Captioner)
        return ContinuousEngine(
            backend,
            slots=settings.batch_size,
            kv_memory_fraction=settings.kv_memory_fraction,
            prefill_chunk=settings.prefill_chunk,
            max_new_tokens=settings.max_new_tokens,
        )
    return Batcher(backend, max_batch_size=settings.effective_batch_size, wait_ms=settings.batch_wait_ms)


def get_gate() -> Gate:
    return _gate


def install_shutdown_grace(grace_s: float) -> None:
    """On a warm shutdown (SIGTERM), hand the jobs still in flight back after ``grace_s``.

    Celery's warm shutdown takes no new message and waits for the running tasks, however long
    they take; with the threads pool it cannot interrupt them. After the grace the batcher
    releases every job not yet captioned: each goes back to `queued` uncounted and its message
    back to the queue, and the worker exits. A cold shutdown (SIGQUIT, a second Ctrl-C) hands
    back at once.
    """
    from celery.signals import worker_shutting_down

    def on_shutting_down(how: str = "Warm", **_: Any) -> None:
        delay = 0.0 if how == "Cold" else grace_s
        log.warning("stopping: jobs still in flight after %.0f s go back to the queue", delay)
        timer = threading.Timer(delay, _hand_back)
        timer.daemon = True
        timer.start()

    worker_shutting_down.connect(on_shutting_down, weak=False)


def _hand_back() -> None:
    _gate.close()
    with _lock:
        batcher = _batcher
    if batcher is not None:
        handed = batcher.hand_back()
        if handed:
            log.warning("handed %d jobs back to the queue", handed)
