"""Watch folders: every finished image dropped into an inbox becomes a job, once.

The observer and its handler, and the loop that turns what they notice into jobs; when a file
is whole is `settle`, the inbox locks `locks`, the sidecars done jobs lack `repair`.

A file is taken when it is complete: at inotify's close-after-write (Linux), or once its size
and mtime have held still for the settle time (files moved in, network mounts, polling), and
in both cases only if it decodes. Temporary names of copy tools are ignored until renamed. A
scan at start and a periodic rescan catch what events miss (files present before the watcher,
inotify overflow); the dedup key makes a restart or a rescan queue nothing twice.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

from celery import Celery
from sqlalchemy.engine import Engine
from watchdog.events import FileClosedEvent, FileSystemEvent, FileSystemEventHandler, FileSystemMovedEvent
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from joycap_queue.config import Settings
from joycap_queue.errors import JoycapError
from joycap_queue.intake.enqueue import enqueue_images
from joycap_queue.intake.watch.config import InboxConfig
from joycap_queue.intake.watch.inbox import InboxState, walk_candidates
from joycap_queue.intake.watch.locks import InboxLocks
from joycap_queue.intake.watch.repair import finish_twins, reconcile
from joycap_queue.intake.watch.settle import observe, take_ready
from joycap_queue.messaging.app import make_celery
from joycap_queue.outages import OutageWait
from joycap_queue.recovery.sweep import recover
from joycap_queue.store import engines

log = logging.getLogger(__name__)

HEARTBEAT_S = 2.0
# A watcher row not refreshed for this long belongs to a watcher that died.
STALE_AFTER = timedelta(seconds=15)
# How long a done job may lack its sidecar before the watcher writes it (see repair.reconcile).
SIDECAR_GRACE = 60.0
TICK_S = 0.25
# While the database or Redis is away, how often the watcher tries again.
OUTAGE_RETRY_S = 1.0
MAX_ENQUEUE = 1000


class NoticeHandler(FileSystemEventHandler):
    """Runs on the observer's thread: only records which paths to look at."""

    def __init__(
        self,
        notices: queue.SimpleQueue[tuple[InboxState, Path, bool]],
        state: InboxState,
        wake: threading.Event,
    ):
        self.notices, self.state, self.wake = notices, state, wake

    def _notice(self, raw: str | bytes, *, closed: bool = False) -> None:
        path = Path(os.fsdecode(raw))
        if self.state.is_candidate(path):
            self.notices.put((self.state, path, closed))
            self.wake.set()

    def on_created(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._notice(event.src_path)

    def on_modified(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._notice(event.src_path)

    def on_closed(self, event: FileSystemEvent) -> None:
        if isinstance(event, FileClosedEvent):
            self._notice(event.src_path, closed=True)

    def on_moved(self, event: FileSystemEvent) -> None:
        if isinstance(event, FileSystemMovedEvent) and not event.is_directory:
            # A rename is how copy tools finish: the new name is complete.
            self._notice(event.dest_path, closed=True)


class FolderWatcher:
    """Watches inboxes with one observer and turns finished images into jobs."""

    def __init__(
        self,
        inboxes: Sequence[InboxConfig],
        settings: Settings,
        *,
        settle_seconds: float = 2.0,
        rescan_seconds: float = 60.0,
        polling: bool = False,
        polling_interval: float = 1.0,
        incomplete_after: float = 600.0,
        sidecar_grace: float = SIDECAR_GRACE,
    ) -> None:
        self.settings = settings
        self.settle_seconds = settle_seconds
        self.rescan_seconds = rescan_seconds
        self.polling = polling
        self.polling_interval = polling_interval
        self.incomplete_after = incomplete_after
        self.sidecar_grace = sidecar_grace
        self.engine: Engine = engines.get_engine(settings.effective_database_url)
        self.app: Celery = make_celery(settings)
        self.states = [InboxState(config, self._excluded(config)) for config in inboxes]
        # The database or Redis away costs this tick's work, not the watcher (see `step`).
        self.outages = OutageWait(
            log.warning, retry_s=OUTAGE_RETRY_S, back="the database and Redis answer again; going on"
        )
        self.notices: queue.SimpleQueue[tuple[InboxState, Path, bool]] = queue.SimpleQueue()
        self.wake = threading.Event()
        self.stop_event = threading.Event()
        self.observer: BaseObserver | None = None
        self.rescans = 0  # completed rescans (see `rescan`)
        self.locks = InboxLocks(
            self.engine, self.states, stale_after=STALE_AFTER, beat_s=HEARTBEAT_S, on_lost=self.stop
        )

    @staticmethod
    def _excluded(config: InboxConfig) -> tuple[Path, ...]:
        outputs = config.request.outputs
        return tuple(Path(d) for d in (outputs.done_dir, outputs.failed_dir) if d)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self.locks.acquire()
        self.locks.start_beating()
        # A watcher that starts after Redis lost its data would otherwise skip the inbox's
        # images as "already queued" while no message exists for them.
        recover(self.settings, self.app, wait=60.0)
        self.observer = PollingObserver(timeout=self.polling_interval) if self.polling else Observer()
        for state in self.states:
            self.observer.schedule(
                NoticeHandler(self.notices, state, self.wake), str(state.root), recursive=True
            )
        self.observer.start()
        # Scan after the observer starts, so a file arriving in between is seen by one or both.
        for state in self.states:
            self.scan(state)
        self.wake.set()

    def stop(self) -> None:
        self.stop_event.set()
        self.wake.set()

    def close(self) -> None:
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(timeout=10)
            self.observer = None
        self.locks.release()

    def run(self, *, on_tick: Callable[[], None] | None = None) -> None:
        """Watch until `stop()`, releasing the inbox locks on the way out.

        ``on_tick`` runs every tick on this thread; what it raises ends the watch (`up` uses it
        to notice a worker that died). A watcher that lost an inbox's lock to another stops,
        raising `JoycapError`.
        """
        try:
            self.start()
            last_rescan = time.time()
            while not self.stop_event.is_set():
                if on_tick is not None:
                    on_tick()
                self.wake.wait(TICK_S)
                self.wake.clear()
                now = time.time()
                self.step(now)
                if now - last_rescan >= self.rescan_seconds:
                    last_rescan = now
                    self.rescan(now)
        finally:
            self.close()
        if self.locks.lost is not None:
            raise JoycapError(f"lost the lock on {self.locks.lost} to another watcher; stopped")

    # -- what one tick does ----------------------------------------------------------------
    def rescan(self, now: float) -> None:
        """Look at every file of every inbox, and write the sidecars that done jobs lack.

        What the walk finds is observed in the same call, so once `rescans` counts it, every file
        present when it began has been looked at: how a test knows that a file left alone was
        seen and refused, rather than not reached yet.
        """
        if self.outages.waiting(now):
            return
        with self.outages.guard(now):
            for state in self.states:
                self.scan(state)
            self._step(now)
            for state in self.states:
                reconcile(self.engine, state, grace_s=self.sidecar_grace)
            self.rescans += 1

    def scan(self, state: InboxState) -> None:
        for path in walk_candidates(state):
            self.notices.put((state, path, False))

    def step(self, now: float) -> None:
        """Observe what the events noticed and queue the files that are ready.

        The database or Redis away ends the step, not the watcher: it says so once, tries again
        every `OUTAGE_RETRY_S`, and the files it found ready meanwhile wait, held, until then.
        """
        if not self.outages.waiting(now):
            with self.outages.guard(now):
                self._step(now)

    def _step(self, now: float) -> None:
        while True:
            try:
                state, path, closed = self.notices.get_nowait()
            except queue.Empty:
                break
            observe(state, path, now, closed=closed)
        for state in self.states:
            ready = state.take_held()
            ready += take_ready(
                state,
                now,
                settle_seconds=self.settle_seconds,
                incomplete_after=self.incomplete_after,
                max_pixels=self.settings.max_image_pixels,
            )
            for start in range(0, len(ready), MAX_ENQUEUE):
                try:
                    self.enqueue(state, ready[start : start + MAX_ENQUEUE])
                except Exception:
                    # Not taken after all: they wait, settled, for the database or Redis. Rows an
                    # intake committed before Redis went are sent by the next intake that finds
                    # them "already queued", or by the workers' sweep (recovery.py).
                    state.hold(ready[start:])
                    raise

    def enqueue(self, state: InboxState, paths: list[Path]) -> None:
        counts = [0, 0, 0, 0]
        # One request per prompt: every file gets a job from each.
        for request in state.config.requests:
            summary = enqueue_images(
                paths,
                request,
                self.settings,
                recursive=False,
                source=[str(state.root)],
                submission_id=state.submission_id,
                app=self.app,
            )
            state.submission_id = summary.submission_id
            state.queued += summary.queued
            state.twins.update(summary.twins)
            for i, value in enumerate(
                (summary.queued, summary.already_done, summary.already_queued, summary.rejected)
            ):
                counts[i] += value
        finish_twins(self.engine, state)
        log.info(
            "%s: queued %d, already done %d, already queued %d, rejected %d",
            state.root,
            *counts,
        )

    def heartbeat(self) -> None:
        """Renew every inbox lock now (the lock thread does so every `HEARTBEAT_S`)."""
        self.locks.heartbeat()
