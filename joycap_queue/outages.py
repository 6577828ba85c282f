"""The database or Redis away: telling it from other errors, and waiting it out in long loops.

A command that has something to finish (`submit`, `export`) stops with one line saying what
failed and that running it again resumes. A command meant to be left running (`watch`, `status
--watch`) says once that it waits, tries again, and goes on where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from joycap_queue.errors import ServiceUnavailable, first_line


def outage(exc: BaseException) -> str | None:
    """One line saying which service is away and why, when ``exc`` is the database or Redis
    unreachable, restarting or busy ("database is locked"); None for any other error.

    Only the driver's first line is kept: SQLAlchemy's own text carries the statement and its
    parameters (captions, paths), which nobody needs to see.
    """
    if isinstance(exc, ServiceUnavailable):
        return first_line(exc)
    if isinstance(exc, OperationalError | InterfaceError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    ):
        return f"the database is unavailable ({first_line(exc.orig if exc.orig is not None else exc)})"
    if isinstance(exc, RedisConnectionError | RedisTimeoutError | KombuOperationalError):
        return f"Redis is unavailable ({first_line(exc)})"
    return None


def outage_line(reason: str, advice: str) -> str:
    """What went away and what to do about it, as one line."""
    return f"{reason.rstrip('. ')}; {advice}"


class OutageWait:
    """A long-running loop's outages: each said once when it begins and once when it ends.

    ``with wait.guard(now):`` around one round of work turns an outage into a pause of
    ``retry_s``; `waiting` says whether the loop should skip its work for now.
    """

    def __init__(self, say: Callable[[str], None], *, retry_s: float, back: str) -> None:
        self.say = say
        self.retry_s = retry_s
        self.back = back
        self.away: str | None = None  # why, while a service is away
        self.retry_at = 0.0

    def waiting(self, now: float) -> bool:
        return self.away is not None and now < self.retry_at

    @contextmanager
    def guard(self, now: float) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            reason = outage(exc)
            if reason is None:
                raise
            if self.away is None:
                self.say(outage_line(reason, "waiting for it to come back"))
            self.away, self.retry_at = reason, now + self.retry_s
            return
        if self.away is not None:
            self.away = None
            self.say(self.back)
