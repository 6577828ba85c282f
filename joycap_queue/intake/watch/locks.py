"""The inbox locks: one watcher per inbox, its lock renewed from a thread of its own.

The watcher's main loop blocks for longer than a lock lives (start-up scans, full decodes,
SQLite busy waits), so the locks are beaten apart from it (`leases.Beat`).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

from sqlalchemy.engine import Engine

from joycap_queue.errors import JoycapError
from joycap_queue.intake.watch.inbox import InboxState
from joycap_queue.store import leases

log = logging.getLogger(__name__)


class InboxLocks:
    """Every inbox's lock or none; ``on_lost`` runs when another watcher took one over."""

    def __init__(
        self,
        engine: Engine,
        states: Sequence[InboxState],
        *,
        stale_after: timedelta,
        beat_s: float,
        on_lost: Callable[[], None],
    ) -> None:
        self.engine = engine
        self.states = states
        self.stale_after = stale_after
        self.beat_s = beat_s
        self.on_lost = on_lost
        self.held: dict[Path, leases.Lease] = {}
        self.beat: leases.Beat | None = None
        self.lost: Path | None = None

    def acquire(self) -> None:
        """Take every inbox's lock or none: a second watcher on an inbox must not start."""
        host, pid = socket.gethostname(), os.getpid()
        for state in self.states:
            lock = leases.take_inbox(
                self.engine, inbox=str(state.root), host=host, pid=pid, stale_after=self.stale_after
            )
            if lock is None:
                holder = leases.holder(self.engine, str(state.root))
                self.release()
                raise JoycapError(f"another watcher is already active on {state.root} ({holder})")
            self.held[state.root] = lock
            state.watcher_id = lock.id

    def start_beating(self) -> None:
        self.beat = leases.Beat(self.beat_s, self.heartbeat, name="watcher-lock").start()

    def release(self) -> None:
        if self.beat is not None:
            self.beat.stop()
            self.beat = None
        for state in self.states:
            lock = self.held.pop(state.root, None)
            if lock is not None:
                leases.release(self.engine, lock)  # owner-checked: a lock taken over stays its new holder's
            state.watcher_id = None

    def heartbeat(self) -> None:
        """Renew every inbox lock (on the lock thread); one found taken over calls ``on_lost``."""
        for state in self.states:
            lock = self.held.get(state.root)
            if lock is None:
                continue
            counters = {"seen": state.seen, "queued": state.queued, "waiting": len(state.pending)}
            if not leases.renew(self.engine, lock, submission_id=state.submission_id, **counters):
                log.error("%s: another watcher took this inbox's lock over; stopping", state.root)
                self.held.pop(state.root, None)
                self.lost = state.root
                self.on_lost()
