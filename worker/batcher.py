"""Dynamic batching: the worker's task threads hand in one image each; one thread runs the model.

A task thread prepares its image (resize, pixels, prompt ids) itself, off the generate thread,
then queues it and waits on a Future. The generate thread takes the oldest request, adds every
queued request with the same generation parameters up to the batch size, waits at most
``wait_ms`` for more to arrive, and runs them in one ``generate`` call. Mixed prompts share a
batch; mixed generation parameters cannot (one ``generate`` call has one set of them).

Failures stay with their image: a batch that raises is split in halves and each half is run
again, down to single images, so only the culprit fails. An out-of-memory error splits the
same way and also lowers the batch size for good, to the largest size that ran.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from celery.exceptions import SoftTimeLimitExceeded

from joycap_queue.errors import first_line
from worker.backends.base import Backend, BackendFront, CaptionInput, CaptionOutput, GenerationParams

log = logging.getLogger(__name__)

# How long past ``wait_ms`` a batch may wait for images still being prepared to join it.
PREPARE_GRACE_S = 1.0


class CaptionService(Protocol):
    """What a caption job needs: the model's name, and one caption at a time from any thread."""

    @property
    def model_id(self) -> str: ...

    @property
    def serving_key(self) -> str: ...

    def caption_one(self, item: CaptionInput, params: GenerationParams) -> CaptionOutput: ...


class HandedBack(Exception):
    """The worker is stopping: this image was not captioned and its job goes back to the queue."""


class CaptionTimedOut(SoftTimeLimitExceeded):
    """A caption did not come back within the task time limit, which Celery's threads pool never
    enforces (it drops time limits); the job fails with that reason, as a Celery time limit would."""


# A model call this long past the time limit means a hung GPU or a runaway generation; exiting
# is the only way to stop it (a CUDA call cannot be interrupted), and the heartbeat's silence
# then hands this worker's jobs to the others. The grace lets the task threads record their
# own timeouts first.
OVERRUN_GRACE_S = 5.0
EXIT_OVERRUN = 70


class CallWatchdog:
    """Ends the process when one model call outlives the time limit; off until ``arm``.

    Calls are tracked per thread: the engine's prefill and decode threads run side by side.
    """

    def __init__(self) -> None:
        self.limit_s: float | None = None
        self._calls: dict[int, tuple[float, str]] = {}
        self._thread: threading.Thread | None = None

    def arm(self, limit_s: float) -> None:
        self.limit_s = limit_s
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="joycap-watchdog", daemon=True)
            self._thread.start()

    @contextmanager
    def call(self, what: str) -> Iterator[None]:
        me = threading.get_ident()
        self._calls[me] = (time.monotonic(), what)
        try:
            yield
        finally:
            self._calls.pop(me, None)

    def _watch(self) -> None:
        while True:
            time.sleep(1.0)
            limit = self.limit_s
            for since, what in list(self._calls.values()):
                if limit is not None and time.monotonic() - since > limit + OVERRUN_GRACE_S:
                    log.critical(
                        "%s has run %.0f s, past the %.0f s time limit: exiting so this worker's "
                        "jobs go to others",
                        what,
                        time.monotonic() - since,
                        limit,
                    )
                    logging.shutdown()
                    os._exit(EXIT_OVERRUN)


def wait_for_caption(future: Future[CaptionOutput], limit_s: float | None) -> CaptionOutput:
    """The caption, or CaptionTimedOut once ``limit_s`` has passed (the Future is then failed)."""
    try:
        return future.result(timeout=limit_s)
    except FutureTimeout:
        settle(future, error=CaptionTimedOut(f"timed out after {limit_s:.0f} s"))
        raise CaptionTimedOut(f"timed out after {limit_s:.0f} s") from None


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's out-of-memory error, recognised without importing torch."""
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


class CaptionStream(BackendFront):
    """What the batcher and the continuous engine share: one model thread, closing, time limits."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.time_limit_s: float | None = None
        self.watchdog = CallWatchdog()

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop after what was already handed in; new images are refused."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def enforce_time_limit(self, limit_s: float) -> None:
        """A caption not back within ``limit_s`` fails; a model call far past it ends the process."""
        self.time_limit_s = limit_s
        self.watchdog.arm(limit_s)


@dataclass
class _Request:
    prepared: Any
    params: GenerationParams
    future: Future[CaptionOutput] = field(default_factory=Future)
    queued_at: float = field(default_factory=time.monotonic)


class Batcher(CaptionStream):
    """Merges concurrent callers' images into batches for one backend; one per worker process."""

    def __init__(self, backend: Backend, *, max_batch_size: int = 8, wait_ms: float = 50.0) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, not {max_batch_size}")
        super().__init__(backend)
        self.max_batch_size = max_batch_size
        self.wait_s = max(wait_ms, 0.0) / 1000.0
        self.batches_run = 0
        self.largest_batch = 0
        self._pending: deque[_Request] = deque()
        # Requests being prepared on task threads right now: they will be ready within
        # milliseconds, so a batch that they would fill waits for them instead of leaving without.
        self._preparing = 0
        self._running: Sequence[_Request] = ()

    def describe(self) -> str:
        return f"{self.backend.describe()}, batches of up to {self.max_batch_size}"

    def start(self) -> Batcher:
        """Start the generate thread (idempotent); requests queued before it wait for it."""
        with self._cond:
            if self._thread is None and self.backend.batches:
                self._thread = threading.Thread(target=self._run, name="joycap-generate", daemon=True)
                self._thread.start()
        return self

    def hand_back(self) -> int:
        """Stop now: every request not yet captioned fails with HandedBack; returns how many.

        The batch on the model runs to its end (a generate call cannot be interrupted), but its
        callers are released at once and its results are dropped.
        """
        with self._cond:
            self._closed = True
            requests = [*self._pending, *self._running]
            self._pending.clear()
            self._cond.notify_all()
        handed = 0
        for request in requests:
            if settle(request.future, error=HandedBack("the worker is stopping")):
                handed += 1
        return handed

    def caption_one(self, item: CaptionInput, params: GenerationParams) -> CaptionOutput:
        """Prepare the image on this thread, then wait for its caption from a shared batch."""
        if not self.backend.batches:
            with self.watchdog.call(f"a {self.backend.name} request"):
                [output] = self.backend.generate([self.backend.prepare(item)], params)
            return output
        with self._cond:
            self._preparing += 1
        request: _Request | None = None
        queued = False
        try:
            request = _Request(self.backend.prepare(item), params)
        finally:
            # Queued in the same breath as it stops counting as "being prepared", so the generate
            # thread never sees it as neither and leaves without it.
            with self._cond:
                self._preparing -= 1
                if request is not None and not self._closed:
                    self._pending.append(request)
                    queued = True
                self._cond.notify_all()
        if request is None or not queued:
            raise RuntimeError("the batcher is closed")
        self.start()
        return wait_for_caption(request.future, self.time_limit_s)

    def submit(self, prepared: Any, params: GenerationParams) -> Future[CaptionOutput]:
        """Queue an item the backend has prepared; its Future holds the caption or the exception."""
        request = _Request(prepared, params)
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._pending.append(request)
            self._cond.notify_all()
        self.start()
        return request.future

    def _take_batch(self) -> list[_Request] | None:
        """The next batch: the oldest request and its like, once full or once it waited long enough."""
        with self._cond:
            while not self._pending:
                if self._closed:
                    return None
                self._cond.wait()
            while True:
                first = self._pending[0]
                same = [r for r in self._pending if r.params == first.params][: self.max_batch_size]
                waited = time.monotonic() - first.queued_at
                limit = self.wait_s + (PREPARE_GRACE_S if self._preparing else 0.0)
                if len(same) >= self.max_batch_size or self._closed or waited >= limit:
                    break
                self._cond.wait(limit - waited)
            taken = {id(r) for r in same}
            self._pending = deque(r for r in self._pending if id(r) not in taken)
            return same

    def _run(self) -> None:
        while (batch := self._take_batch()) is not None:
            batch = [r for r in batch if r.future.set_running_or_notify_cancel()]
            if batch:
                self._running = batch
                try:
                    self._run_batch(batch)
                finally:
                    self._running = ()

    def _run_batch(self, batch: Sequence[_Request]) -> None:
        started = time.monotonic()
        failure: Exception | None = None
        try:
            with self.watchdog.call(f"a generate call of {len(batch)} images"):
                outputs = self.backend.generate([r.prepared for r in batch], batch[0].params)
        except Exception as exc:  # noqa: BLE001 - every failure is handed to its requests
            failure = without_frames(exc)
        if failure is not None:
            # Outside the except block: while an exception is being handled, its traceback keeps
            # the failed generate's frames, and with them its KV cache and activations, alive.
            # Rerunning the halves in there ran out of memory again even at batch size 1.
            self._recover(batch, failure)
            return
        log.info("batch of %d captioned in %.2f s", len(batch), time.monotonic() - started)
        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        for request, output in zip(batch, outputs, strict=True):
            settle(request.future, result=output)

    def _recover(self, batch: Sequence[_Request], exc: Exception) -> None:
        if len(batch) == 1:
            settle(batch[0].future, error=exc)
            return
        half = (len(batch) + 1) // 2
        if is_out_of_memory(exc):
            self.backend.release_memory()
            if half < self.max_batch_size:
                log.warning("out of memory at batch size %d: batches are now at most %d", len(batch), half)
                self.max_batch_size = half
        else:
            log.warning("a batch of %d failed (%s); running its halves apart", len(batch), one_line(exc))
        start = 0
        while start < len(batch):
            # Re-read the limit per part: a first half that ran out of memory again lowered it.
            step = min(half, self.max_batch_size)
            self._run_batch(batch[start : start + step])
            start += step


def settle(
    future: Future[CaptionOutput], *, result: CaptionOutput | None = None, error: BaseException | None = None
) -> bool:
    """Set a future's outcome unless it has one already (handed back while its batch ran)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            assert result is not None
            future.set_result(result)
    except InvalidStateError:
        return False
    return True


def without_frames(exc: BaseException) -> Exception:
    """The exception and its chain with their tracebacks dropped, so their frames can be freed."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        link.__traceback__ = None
        link = link.__cause__ or link.__context__
    assert isinstance(exc, Exception)
    return exc


def one_line(exc: BaseException) -> str:
    """The exception's class and the first line of its message."""
    name, message = type(exc).__name__, first_line(exc)
    return name if message == name else f"{name}: {message}"
