"""One writer per worker process that stores the captions finishing together in one transaction.

A batch ends with all of its captions at once. Each task thread storing its own would be one
transaction each: on SQLite a WAL append and a hand-over of its one write lock per caption,
on PostgreSQL a commit round trip per caption. Here the task threads hand their caption over
and wait; the writer takes everything handed in since its last commit and stores it in one
transaction (``jobstate.complete_jobs``), each job still its own conditional UPDATE. It never waits
for more to arrive: a caption alone is stored at once, and whatever comes in while a commit is
under way goes into the next one.

Each task thread still waits for its own row to be committed before its message is
acknowledged. Transient errors are retried with backoff for the group; a value the database
refuses rolls the group back, and the group is then stored one caption at a time, so only the
job whose value was refused fails.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future

from sqlalchemy.engine import Engine

from joycap_queue.store import engines, jobstate
from joycap_queue.store.jobstate import Completion

log = logging.getLogger(__name__)
# A few batches' worth: more per transaction gains nothing and holds SQLite's lock longer.
MAX_GROUP = 64


class CompletionWriter:
    """``complete`` from any thread; it returns once its own row is committed."""

    def __init__(self, engine: Engine, *, retry_s: float) -> None:
        self.engine = engine
        self.retry_s = retry_s
        self._pending: list[tuple[Completion, Future[bool]]] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    @property
    def backlog(self) -> int:
        """Captions handed in and not yet taken into a transaction."""
        with self._wake:
            return len(self._pending)

    def complete(self, completion: Completion) -> bool:
        """``jobstate.complete_jobs`` for one caption, with the others waiting; raises what it raised."""
        future: Future[bool] = Future()
        with self._wake:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="joycap-completions", daemon=True)
                self._thread.start()
            self._pending.append((completion, future))
            self._wake.notify()
        return future.result()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._pending:
                    self._wake.wait()
                group, self._pending = self._pending[:MAX_GROUP], self._pending[MAX_GROUP:]
            try:
                self._store(group)
            except BaseException as exc:  # noqa: BLE001 - the writer must outlive any one group
                # Whatever went wrong goes to the task threads waiting on this group, so none
                # of them waits for good.
                for _completion, future in group:
                    if not future.done():
                        future.set_exception(exc)

    def _store(self, group: list[tuple[Completion, Future[bool]]]) -> None:
        items = [completion for completion, _future in group]
        try:
            stored = engines.retrying(self.retry_s, what=_describe(items))(
                jobstate.complete_jobs, self.engine, items
            )
        except Exception as exc:
            if len(group) == 1 or engines.is_transient(exc):
                # One caption, or the database stayed away for the whole retry budget: storing
                # each alone would only wait that long again, once per caption.
                for _completion, future in group:
                    future.set_exception(exc)
                return
            log.warning("storing %d captions together failed (%s); storing them one by one", len(items), exc)
            for completion, future in group:
                self._store_one(completion, future)
            return
        for (_completion, future), done in zip(group, stored, strict=True):
            future.set_result(done)

    def _store_one(self, completion: Completion, future: Future[bool]) -> None:
        try:
            stored = engines.retrying(self.retry_s, what=_describe([completion]))(
                jobstate.complete_jobs, self.engine, [completion]
            )
        except Exception as exc:  # noqa: BLE001 - it belongs to the task thread that waits on it
            future.set_exception(exc)
        else:
            future.set_result(stored[0])


def _describe(items: list[Completion]) -> str:
    more = f" and {len(items) - 1} more" if len(items) > 1 else ""
    return f"store the caption of job {items[0].job_id}{more}"


_writers: dict[Engine, CompletionWriter] = {}
_writers_lock = threading.Lock()


def get_completion_writer(engine: Engine, *, retry_s: float) -> CompletionWriter:
    """This process's writer for ``engine``: one, so that its task threads' captions meet in it."""
    with _writers_lock:
        writer = _writers.get(engine)
        if writer is None:
            writer = _writers[engine] = CompletionWriter(engine, retry_s=retry_s)
        return writer
