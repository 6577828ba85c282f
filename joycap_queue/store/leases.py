"""Leases: rows a process keeps fresh to say it is alive (workers, Flower) or holds an inbox.

One implementation for all of them, because they share two hazards:

- **Clocks.** Every heartbeat is written, and every staleness judged, with the database's own
  clock (`db_utcnow`, `db_ago`), never the host's: a host whose clock runs a minute behind would
  otherwise look dead to the others, or a dead one alive.
- **Owners.** Each lease carries a token of its own (`owner`). Renewing or releasing a row that
  someone else has taken over, or that a cleanup deleted, changes nothing and says so: a worker
  then registers again, a watcher knows it lost its inbox and stops.

`Beat` runs a heartbeat on a thread of its own, so a busy main loop cannot starve it, and it
survives any error: a thread that dies quietly makes a live process look dead for good.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import DateTime, delete, insert, literal, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement
from sqlmodel import col

from joycap_queue.config import mask_url
from joycap_queue.errors import first_line
from joycap_queue.store.models import Endpoint, Watcher, utcnow

log = logging.getLogger(__name__)
LeaseTable = type[Endpoint] | type[Watcher]


class db_ago(FunctionElement[Any]):
    """The database's UTC time, less a number of seconds, in the form the columns are stored in.

    SQLite stores naive UTC text with microseconds, so its clock is formatted the same way (the
    text comparison is then a time comparison); PostgreSQL's `now()` is taken in UTC because the
    columns are `timestamp without time zone` holding UTC.
    """

    type = DateTime()
    name = "db_ago"
    inherit_cache = True


def db_utcnow() -> db_ago:
    return db_ago(literal(0.0))


def seconds_ago(seconds: float | timedelta) -> db_ago:
    value = seconds.total_seconds() if isinstance(seconds, timedelta) else float(seconds)
    return db_ago(literal(value))


@compiles(db_ago, "sqlite")
def _sqlite_ago(element: db_ago, compiler: SQLCompiler, **kw: Any) -> str:
    seconds = compiler.process(element.clauses, **kw)
    return f"(strftime('%Y-%m-%d %H:%M:%f', julianday('now') - ({seconds}) / 86400.0) || '000')"


@compiles(db_ago, "postgresql")
def _postgres_ago(element: db_ago, compiler: SQLCompiler, **kw: Any) -> str:
    seconds = compiler.process(element.clauses, **kw)
    return f"((now() AT TIME ZONE 'utc') - ({seconds}) * interval '1 second')"


def fresh(table: LeaseTable, stale_after: timedelta) -> Any:
    """The WHERE clause of rows beaten within ``stale_after``, by the database's clock."""
    return col(table.heartbeat_at) >= seconds_ago(stale_after)


@dataclass(frozen=True)
class Lease:
    table: LeaseTable
    id: int
    owner: str


def _token() -> str:
    return uuid.uuid4().hex


def register(
    engine: Engine, *, kind: str, url: str, host: str, pid: int, started_at: datetime | None = None
) -> Lease:
    """A new `endpoint` row for this process (a worker, Flower).

    ``started_at`` is the incarnation's start (the host's clock, like the jobs it claims, which
    are compared with it): a worker registering again keeps its first one, so the jobs it took
    before are still its own.
    """
    owner = _token()
    with engine.begin() as conn:
        row_id: Any = conn.execute(
            insert(Endpoint)
            .values(
                kind=kind,
                url=url,
                host=host,
                pid=pid,
                owner=owner,
                started_at=started_at or utcnow(),
                heartbeat_at=db_utcnow(),
            )
            .returning(col(Endpoint.id))
        ).scalar_one()
    return Lease(Endpoint, int(row_id), owner)


def take_inbox(engine: Engine, *, inbox: str, host: str, pid: int, stale_after: timedelta) -> Lease | None:
    """Take the inbox's `watcher` row (its lock); None while another live watcher holds it.

    A row not beaten for ``stale_after`` belongs to a watcher that died; it is taken over in one
    conditional UPDATE with a new owner, so of two newcomers one wins, and the old holder, should
    it wake up, finds the row no longer its own.
    """
    owner = _token()
    values: dict[str, Any] = {"host": host, "pid": pid, "owner": owner, "started_at": utcnow()}
    values["heartbeat_at"] = db_utcnow()
    try:
        with engine.begin() as conn:
            row_id: Any = conn.execute(
                insert(Watcher).values(inbox=inbox, **values).returning(col(Watcher.id))
            ).scalar_one()
        return Lease(Watcher, int(row_id), owner)
    except IntegrityError:
        pass
    with engine.begin() as conn:
        row_id = conn.execute(
            update(Watcher)
            .where(col(Watcher.inbox) == inbox, ~fresh(Watcher, stale_after))
            .values(**values, submission_id=None, seen=0, queued=0, waiting=0)
            .returning(col(Watcher.id))
        ).scalar()
    return Lease(Watcher, int(row_id), owner) if row_id is not None else None


def renew(engine: Engine, lease: Lease, **values: Any) -> bool:
    """Beat: refresh the row (and set ``values``) if it is still ours; False when it is not."""
    table = lease.table
    with engine.begin() as conn:
        result = conn.execute(
            update(table)
            .where(col(table.id) == lease.id, col(table.owner) == lease.owner)
            .values(heartbeat_at=db_utcnow(), **values)
        )
        return bool(result.rowcount)


def release(engine: Engine, lease: Lease) -> bool:
    """Delete the row if it is still ours: a lock taken over belongs to its new holder."""
    table = lease.table
    with engine.begin() as conn:
        result = conn.execute(delete(table).where(col(table.id) == lease.id, col(table.owner) == lease.owner))
        return bool(result.rowcount)


def remove_dead(engine: Engine, endpoint_id: int, *, stale_after: timedelta) -> bool:
    """Delete a dead process's `endpoint` row, unless it beat again meanwhile (it was only stalled)."""
    with engine.begin() as conn:
        result = conn.execute(
            delete(Endpoint).where(col(Endpoint.id) == endpoint_id, ~fresh(Endpoint, stale_after))
        )
        return bool(result.rowcount)


def holder(engine: Engine, inbox: str) -> str:
    with engine.connect() as conn:
        row = conn.execute(
            select(col(Watcher.pid), col(Watcher.host)).where(col(Watcher.inbox) == inbox)
        ).first()
    return f"pid {row.pid} on {row.host}" if row else "unknown"


def reason(exc: BaseException) -> str:
    """One line for the log: the error's first line, any URL in it masked."""
    return mask_url(first_line(exc, driver=True))


class Beat:
    """Calls ``beat`` every ``interval`` seconds on a daemon thread until `stop`.

    Whatever ``beat`` raises is logged and the next beat tries again: the database or Redis away
    for a while must cost beats, not the thread.
    """

    def __init__(self, interval: float, beat: Callable[[], None], *, name: str) -> None:
        self.interval = interval
        self.beat = beat
        self.beats = 0  # completed calls, failed or not: how a test knows a beat happened
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Beat:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception as exc:  # noqa: BLE001 - a dead heartbeat thread is worse than any error
                self.failures += 1
                log.warning("%s: %s", self._thread.name, reason(exc))
            self.beats += 1

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=timeout)


class EndpointLease:
    """An `endpoint` row kept fresh; registered again if a cleanup deleted it meanwhile.

    A process judged dead while it was only stalled (frozen, its database away) has its row
    removed by the dead-worker cleanup; without registering again it would stay invisible for
    the rest of its life while it keeps working.
    """

    def __init__(self, engine: Engine, *, kind: str, url: str, host: str, pid: int) -> None:
        self.engine = engine
        self.kind, self.url, self.host, self.pid = kind, url, host, pid
        self.started_at = utcnow()
        self.lease: Lease | None = None

    def take(self) -> EndpointLease:
        self.lease = register(
            self.engine,
            kind=self.kind,
            url=self.url,
            host=self.host,
            pid=self.pid,
            started_at=self.started_at,
        )
        return self

    def renew(self, **values: Any) -> None:
        if self.lease is not None and renew(self.engine, self.lease, **values):
            return
        log.warning(
            "%s %s: its row was gone (judged dead while alive?); registering again", self.kind, self.url
        )
        self.take()

    def release(self) -> None:
        if self.lease is not None:
            lease, self.lease = self.lease, None
            release(self.engine, lease)
