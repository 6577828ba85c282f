"""Engines per database URL, SQLite's pragmas and write lock, and retrying writes while the database is away."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import (
    ArgumentError,
    InterfaceError,
    NoSuchModuleError,
    OperationalError,
)
from sqlmodel import create_engine
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from joycap_queue.config import mask_url
from joycap_queue.errors import OptionError, ServiceUnavailable, first_line
from joycap_queue.store.schema import create_schema

log = logging.getLogger(__name__)


def normalize_url(url: str) -> str:
    """Accept the URLs people paste (``postgres://``, ``postgresql://``) and pick the psycopg 3 driver."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the CLI read while workers write; busy_timeout turns short lock waits into waits,
    # not "database is locked" errors, when several worker processes share one file.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


_engines: dict[str, Engine] = {}
_write_locks: dict[Engine, threading.Lock] = {}
_engines_lock = threading.Lock()


def get_engine(url: str) -> Engine:
    """One engine per database URL and process; the schema is created on first use."""
    with _engines_lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = _make_engine(url)
        return engine


def dispose_engines() -> None:
    """Close every pooled connection (tests, and processes about to fork)."""
    with _engines_lock:
        for engine in _engines.values():
            engine.dispose()
            _write_locks.pop(engine, None)
        _engines.clear()


def _make_engine(url: str) -> Engine:
    url = normalize_url(url)
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise OptionError("database_url", f"malformed database URL: {mask_url(url)}") from None
    try:
        if parsed.get_backend_name() == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            # A worker's task threads each hold a connection for a moment: with fewer pooled than
            # threads, the overflow is opened (and its pragmas run) and closed again on every job.
            engine = create_engine(
                url, connect_args={"timeout": 30, "check_same_thread": False}, pool_size=32, max_overflow=32
            )
            _write_locks[engine] = threading.Lock()
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            # A connect that hangs (a network dropping packets) would block a heartbeat thread
            # for good and make a live worker look dead: give up after 10 s and retry instead.
            engine = create_engine(
                url, pool_pre_ping=True, pool_size=5, max_overflow=10, connect_args={"connect_timeout": 10}
            )
    except NoSuchModuleError:
        raise OptionError("database_url", f"unsupported database URL: {mask_url(url)}") from None
    try:
        create_schema(engine)
    except OperationalError as exc:
        engine.dispose()
        reason = first_line(exc.orig) if exc.orig else "connection failed"
        raise ServiceUnavailable(f"cannot reach the database at {mask_url(url)}: {reason}") from None
    return engine


@contextmanager
def writing(engine: Engine) -> Iterator[Connection]:
    """One write transaction; on SQLite, one at a time in this process.

    SQLite has one writer at a time. Threads that meet its lock wait in its busy handler, which
    sleeps 1 ms, then 2, 5, 10 ... before looking again; queueing on a lock here instead hands
    the file over the moment it is free. Other processes still meet the busy handler.
    """
    lock = _write_locks.get(engine)
    if lock is None:
        with engine.begin() as conn:
            yield conn
        return
    with lock, engine.begin() as conn:
        yield conn


def is_transient(exc: BaseException) -> bool:
    # Lost connections, a database starting up, SQLite still busy after its busy_timeout; a value
    # refused (DataError, IntegrityError) is not: retrying cannot change the answer.
    return isinstance(exc, OperationalError | InterfaceError)


def retrying(budget_s: float, *, what: str) -> Retrying:
    """Call a database write again with backoff while the database is briefly away.

    ``retrying(300, what="store job 7")(complete_job, engine, 7, ...)``; the last error is
    raised once ``budget_s`` has passed.
    """

    def log_retry(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        reason = first_line(exc, driver=True) if exc else ""
        log.warning("database write failed (%s): %s; retrying", what, mask_url(reason))

    return Retrying(
        retry=retry_if_exception(is_transient),
        stop=stop_after_delay(budget_s),
        # wait_exponential_jitter's first argument is named differently across tenacity 8 and 9.
        wait=wait_exponential(multiplier=0.2, max=10.0) + wait_random(0, 1),
        before_sleep=log_retry,
        reraise=True,
    )
