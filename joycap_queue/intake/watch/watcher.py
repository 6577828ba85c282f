"""Watch folders: every finished image dropped into an inbox becomes a job, once.

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
import socket
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

from celery import Celery
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from joycap_queue.config import Settings
from joycap_queue.errors import JoycapError
from joycap_queue.intake.enqueue import enqueue_images
from joycap_queue.intake.images import decodes_completely, has_end_marker
from joycap_queue.intake.watch.config import InboxConfig
from joycap_queue.intake.watch.inbox import InboxState, NoticeHandler, Pending, walk_candidates
from joycap_queue.messaging.app import make_celery
from joycap_queue.outages import OutageWait
from joycap_queue.recovery.sweep import recover
from joycap_queue.results.sidecars import (
    finish_job_outputs,
    has_sidecar,
    sidecar_record,
    write_sidecars,
)
from joycap_queue.store import engines, leases
from joycap_queue.store.models import Job, JobPublic, JobStatus, utcnow

log = logging.getLogger(__name__)

HEARTBEAT_S = 2.0
# A watcher row not refreshed for this long belongs to a watcher that died.
STALE_AFTER = timedelta(seconds=15)
# How long a done job may lack its sidecar before the watcher writes it (see reconcile).
SIDECAR_GRACE = 60.0
TICK_S = 0.25
# While the database or Redis is away, how often the watcher tries again.
OUTAGE_RETRY_S = 1.0
MAX_ENQUEUE = 1000


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
        # The inbox locks (leases.py), beaten from a thread of their own: the main loop blocks
        # for longer than a lock lives (start-up scans, full decodes, SQLite busy waits).
        self.locks: dict[Path, leases.Lease] = {}
        self.lock_beat: leases.Beat | None = None
        self.lost_lock: Path | None = None

    @staticmethod
    def _excluded(config: InboxConfig) -> tuple[Path, ...]:
        outputs = config.request.outputs
        return tuple(Path(d) for d in (outputs.done_dir, outputs.failed_dir) if d)

    # -- lifecycle -------------------------------------------------------------------------
    def acquire(self) -> None:
        """Take every inbox's lock or none: a second watcher on an inbox must not start."""
        host, pid = socket.gethostname(), os.getpid()
        for state in self.states:
            lock = leases.take_inbox(
                self.engine, inbox=str(state.root), host=host, pid=pid, stale_after=STALE_AFTER
            )
            if lock is None:
                holder = leases.holder(self.engine, str(state.root))
                self.release()
                raise JoycapError(f"another watcher is already active on {state.root} ({holder})")
            self.locks[state.root] = lock
            state.watcher_id = lock.id

    def release(self) -> None:
        if self.lock_beat is not None:
            self.lock_beat.stop()
            self.lock_beat = None
        for state in self.states:
            lock = self.locks.pop(state.root, None)
            if lock is not None:
                leases.release(self.engine, lock)  # owner-checked: a lock taken over stays its new holder's
            state.watcher_id = None

    def start(self) -> None:
        self.acquire()
        self.lock_beat = leases.Beat(HEARTBEAT_S, self.heartbeat, name="watcher-lock").start()
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
        self.release()

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
        if self.lost_lock is not None:
            raise JoycapError(f"lost the lock on {self.lost_lock} to another watcher; stopped")

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
                self.reconcile(state)
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
            self._observe(state, path, now, closed=closed)
        for state in self.states:
            ready = [*state.take_held(), *self._ready(state, now)]
            for start in range(0, len(ready), MAX_ENQUEUE):
                try:
                    self.enqueue(state, ready[start : start + MAX_ENQUEUE])
                except Exception:
                    # Not taken after all: they wait, settled, for the database or Redis. Rows an
                    # intake committed before Redis went are sent by the next intake that finds
                    # them "already queued", or by the workers' sweep (recovery.py).
                    state.hold(ready[start:])
                    raise

    def _observe(self, state: InboxState, path: Path, now: float, *, closed: bool) -> None:
        try:
            stat = path.stat()
        except OSError:
            state.pending.pop(path, None)
            return
        signature = (stat.st_size, stat.st_mtime_ns)
        if signature in (state.handled.get(path), state.held.get(path)):
            return
        entry = state.pending.get(path)
        if entry is None:
            state.seen += 1
            # A file unchanged since long before we saw it (present at start, moved in) counts
            # as settled from its mtime; one being written has a fresh mtime and must wait.
            entry = state.pending[path] = Pending(*signature, changed_at=min(now, stat.st_mtime))
        elif (entry.size, entry.mtime_ns) != signature:
            entry.size, entry.mtime_ns, entry.changed_at = *signature, now
            entry.undecodable = False
        entry.closed = entry.closed or closed

    def _ready(self, state: InboxState, now: float) -> list[Path]:
        ready = []
        for path, entry in list(state.pending.items()):
            if entry.undecodable:
                if now - entry.changed_at >= self.incomplete_after:
                    # Unchanged for this long and still not an image: not a slow writer but a
                    # broken file. Queued, it becomes a failed job with its reason.
                    del state.pending[path]
                    state.handled[path] = (entry.size, entry.mtime_ns)
                    ready.append(path)
                continue
            if not entry.closed and now - entry.changed_at < self.settle_seconds:
                continue
            try:
                stat = path.stat()
            except OSError:
                del state.pending[path]
                continue
            if (stat.st_size, stat.st_mtime_ns) != (entry.size, entry.mtime_ns):
                entry.size, entry.mtime_ns, entry.changed_at = stat.st_size, stat.st_mtime_ns, now
                entry.closed = False
                continue
            settled = now - entry.changed_at >= self.settle_seconds
            # At a close event the file must also end properly: a writer that reopens to append
            # leaves a decodable prefix behind at every close. A settled file needs only decode.
            if (settled or has_end_marker(path)) and decodes_completely(
                path, max_pixels=self.settings.max_image_pixels
            ):
                del state.pending[path]
                state.handled[path] = (entry.size, entry.mtime_ns)
                ready.append(path)
            elif entry.closed:
                # Closed but not whole: a writer that reopens to append; wait for it to settle.
                entry.closed = False
                entry.changed_at = now
            else:
                entry.undecodable = True
                if not entry.warned:
                    entry.warned = True
                    log.warning(
                        "%s is not a complete image; waiting for it to change (queued as broken after %g s)",
                        path,
                        self.incomplete_after,
                    )
        return ready

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
        self._finish_twins(state)
        log.info(
            "%s: queued %d, already done %d, already queued %d, rejected %d",
            state.root,
            *counts,
        )

    def _finish_twins(self, state: InboxState) -> None:
        """Copies of an image captioned (or queued) under another path get the same sidecars."""
        if not state.twins:
            return
        with Session(self.engine) as session:
            jobs = session.exec(select(Job).where(col(Job.id).in_(list(state.twins.values())))).all()
        by_id = {job.id: job for job in jobs}
        for twin, job_id in list(state.twins.items()):
            job = by_id.get(job_id)
            if job is None or job.status == JobStatus.failed.value:
                del state.twins[twin]
            elif job.status == JobStatus.done.value and job.caption is not None:
                if twin.exists():
                    record = {**sidecar_record(JobPublic.model_validate(job)), "image": twin.name}
                    write_sidecars(twin, state.outputs, caption=job.caption, record=record)
                del state.twins[twin]

    def reconcile(self, state: InboxState) -> None:
        """Give done jobs of this inbox the sidecars they lack (a worker died after storing)."""
        self._finish_twins(state)
        outputs = state.outputs
        if not (outputs.txt or outputs.json):
            return
        # The worker writes a job's sidecars right after storing it; only a job done for longer
        # than the grace is one whose worker died in between. A younger one may be in the middle
        # of its move, and two finishers of one image race each other.
        cutoff = utcnow() - timedelta(seconds=self.sidecar_grace)
        with Session(self.engine) as session:
            jobs = session.exec(
                select(Job.id, Job.path).where(
                    col(Job.path).startswith(str(state.root) + os.sep),
                    Job.status == JobStatus.done.value,
                    col(Job.finished_at) < cutoff,
                )
            ).all()
        for job_id, path in jobs:
            image = Path(path)
            if not image.exists() or not state.is_candidate(image):
                continue
            missing = (outputs.txt and not has_sidecar(image, ".txt")) or (
                outputs.json and not has_sidecar(image, ".json")
            )
            if missing:
                assert job_id is not None
                finish_job_outputs(self.engine, job_id)

    def heartbeat(self) -> None:
        """Renew every inbox lock (on the lock thread); one found taken over stops the watcher."""
        for state in self.states:
            lock = self.locks.get(state.root)
            if lock is None:
                continue
            counters = {"seen": state.seen, "queued": state.queued, "waiting": len(state.pending)}
            if not leases.renew(self.engine, lock, submission_id=state.submission_id, **counters):
                log.error("%s: another watcher took this inbox's lock over; stopping", state.root)
                self.locks.pop(state.root, None)
                self.lost_lock = state.root
                self.stop()
