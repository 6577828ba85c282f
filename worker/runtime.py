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
    from worker.engine import ContinuousEngine

# What task threads hand images to: the continuous engine, or the batcher over any backend.
CaptionStream = Union[Batcher, "ContinuousEngine"]

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
    """The process's caption stream over its backend, started (the engine warmed up and captured)."""
    global _batcher
    settings = settings or get_settings()
    backend = get_backend(settings)
    with _lock:
        if _batcher is None:
            _batcher = _make_stream(settings, backend)
        batcher = _batcher
    return batcher.start()


def _make_stream(settings: Settings, backend: Backend) -> CaptionStream:
    if settings.uses_engine:
        from worker.captioner import Captioner
        from worker.engine import ContinuousEngine

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


def reuse_redis_clients() -> None:
    """Let kombu's Redis channel reuse one ``redis.Redis`` client instead of building one per call.

    kombu builds a new client for every publish and every ack (``Channel.conn_or_acquire``); with
    redis-py 8 each costs about 0.15 ms of Python (its response-callback tables), and a task makes
    four or five: task events, the unacked index, the ack. The connection pool is shared anyway,
    and a client over a pool is thread-safe, so one client per channel (and pool) does the same
    work. Only the worker process calls this, before it consumes.
    """
    from kombu.transport import redis as kombu_redis
    from redis.exceptions import ConnectionError as RedisConnectionError

    original = kombu_redis.Channel._create_client
    if getattr(original, "reuses_clients", False):
        return

    def _create_client(self: Any, asynchronous: bool = False) -> Any:
        if asynchronous:
            return original(self, asynchronous=True)
        client = self.__dict__.get("_joycap_client")
        try:
            pool = self.pool
        except AttributeError as exc:
            # The channel's connection was closed under it (Redis went away): kombu then fails
            # with an AttributeError, which Celery treats as fatal and exits. As a connection
            # error it reconnects instead; a message whose ack is lost here is delivered again
            # and skipped (its job is finished).
            raise RedisConnectionError("the connection to Redis was closed") from exc
        if client is None or client.connection_pool is not pool:
            client = self.__dict__["_joycap_client"] = original(self)
        return client

    _create_client.reuses_clients = True  # type: ignore[attr-defined]
    kombu_redis.Channel._create_client = _create_client  # type: ignore[method-assign]


# Task events (received, succeeded) published together at most this often: Flower sees them a
# few milliseconds later, and the consumer makes one Redis round trip per window instead of one
# per event (about 0.4 ms of the consumer thread per job, measured with py-spy on bench overhead).
EVENT_FLUSH_S = 0.02


def batch_task_events(window_s: float = EVENT_FLUSH_S) -> None:
    """Let Celery's consumer flush its buffered task events once per ``window_s``, not per event.

    Celery already buffers task events and publishes a buffer as one ``task.multi`` message, but
    it schedules a flush for every event, so with a job every few milliseconds each flush carries
    one. Here the first event of a window schedules the flush (on the consumer's own loop, which
    is the only thread that touches its timer) and the others join it. Only the worker calls this.
    """
    from celery.worker.consumer.consumer import Consumer
    from vine import promise

    original = Consumer.on_send_event_buffered
    if getattr(original, "batches_events", False):
        return

    def on_send_event_buffered(self: Any) -> None:
        hub = self.hub
        if hub is None:
            return original(self)
        scheduler = self.__dict__.get("_joycap_schedule")
        if scheduler is None:
            scheduler = self.__dict__["_joycap_schedule"] = promise(lambda: _schedule_flush(self, window_s))
        hub.call_soon(scheduler)  # thread-safe: pool threads send task-succeeded events too
        return None

    on_send_event_buffered.batches_events = True  # type: ignore[attr-defined]
    Consumer.on_send_event_buffered = on_send_event_buffered


def _schedule_flush(consumer: Any, window_s: float) -> None:
    # On the consumer's loop thread: one flush per window.
    if consumer.__dict__.get("_joycap_flush_due"):
        return
    consumer.__dict__["_joycap_flush_due"] = True

    def flush() -> None:
        consumer.__dict__["_joycap_flush_due"] = False
        consumer._flush_events()

    consumer.hub.call_later(window_s, flush)
