"""Workers' heartbeats: each worker process says it is alive, and looks after the dead.

Every worker process registers itself (an `endpoint` row of kind ``worker``, named by its Celery
node name) and refreshes it every ``worker_heartbeat_s``, by the database's clock (leases.py).
A row found gone (a cleanup judged the worker dead while it was only stalled) is registered
again. On each beat it also runs `recovery.recover`: dead workers' jobs handed out again at once,
and every ``SWEEP_BEATS`` beats a full database-versus-Redis sweep that resends what has no
message (a submit interrupted between commit and send, a message lost in flight).

The beat runs on a thread of its own that survives any error: a heartbeat that died quietly
would leave a live, consuming worker judged dead for good.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable

from celery import Celery

from joycap_queue.config import Settings
from joycap_queue.messaging.app import make_celery
from joycap_queue.recovery.sweep import (
    IN_FLIGHT,
    STALE_BEATS,
    WORKER_KIND,
    blame,
    finish_outputs_of_dead,
    orphaned_jobs,
    recover,
    stale_after,
)
from joycap_queue.store import engines, leases

__all__ = [
    "STALE_BEATS",
    "SWEEP_BEATS",
    "WORKER_KIND",
    "WorkerHeartbeat",
    "blame",
    "broker_was_wiped",
    "finish_outputs_of_dead",
    "orphaned_jobs",
    "stale_after",
]
log = logging.getLogger(__name__)
# A full database-versus-Redis sweep every this many beats (a minute at the default 5 s): it
# reads every queued row and every message, too much for every beat of a big queue.
SWEEP_BEATS = 12


def broker_was_wiped(settings: Settings, app: Celery) -> bool:
    """True once after Redis lost its data (and on a brand-new Redis): a marker key is gone.

    SET NX: of all the workers noticing at once, one answers True and does the resending.
    """
    with app.connection_for_write() as connection:
        client = connection.default_channel.client
        return bool(client.set(f"joycap:alive:{settings.queue}", "1", nx=True))


class WorkerHeartbeat:
    """Registers this worker process, keeps it fresh, and runs recovery on each beat."""

    def __init__(self, settings: Settings, name: str, state: Callable[[], str] | None = None) -> None:
        self.settings = settings
        self.name = name
        # The model's state, shown by `status` ("idle-unloaded" is alive, not dead).
        self.state = state
        self.engine = engines.get_engine(settings.effective_database_url)
        self.app = make_celery(settings)
        self.endpoint = leases.EndpointLease(
            self.engine, kind=WORKER_KIND, url=name, host=socket.gethostname(), pid=os.getpid()
        )
        self.beat = leases.Beat(settings.worker_heartbeat_s, self._beat, name="joycap-heartbeat")
        self._beats = 0
        self._sweep_at: float | None = None

    def start(self) -> WorkerHeartbeat:
        self.endpoint.take()
        self.beat.start()
        return self

    def _beat(self) -> None:
        # First the row, so a broken Redis never makes a live worker look dead.
        self.endpoint.renew(**({"state": self.state()} if self.state is not None else {}))
        self._beats += 1
        settle = stale_after(self.settings)
        full = self._beats % SWEEP_BEATS == 0
        in_flight = max(IN_FLIGHT, settle)
        if broker_was_wiped(self.settings, self.app):
            # Redis restarted without its data: every waiting message is gone. Compare now, and
            # once more when sends in flight during the loss have landed.
            log.warning("Redis lost its data: sending again every job it no longer holds")
            full, in_flight = True, settle
            self._sweep_at = time.monotonic() + settle.total_seconds()
        elif self._sweep_at is not None and time.monotonic() >= self._sweep_at:
            full, in_flight, self._sweep_at = True, settle, None
        summary = recover(self.settings, self.app, resend=full, in_flight=in_flight)
        if summary.rescued:
            # A worker killed while it took a message off the queue, before Redis filed it as
            # delivered, lost it outright: once the dust settles, a full comparison resends it.
            self._sweep_at = time.monotonic() + settle.total_seconds()

    def stop(self) -> None:
        self.beat.stop()
        try:
            self.endpoint.release()
        except Exception as exc:  # noqa: BLE001 - stopping must finish; the row goes stale anyway
            log.warning("could not unregister worker %s: %s", self.name, leases.reason(exc))
