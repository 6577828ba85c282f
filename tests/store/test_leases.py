"""Leases: owner-checked, on the database's clock; one inbox, one watcher."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlmodel import col

from joycap_queue.errors import JoycapError
from joycap_queue.store import engines, leases
from joycap_queue.store.models import Watcher
from tests.support.services import Service, wait_until
from tests.support.watching import RunningWatcher, watchers


@pytest.fixture
def start_watcher() -> Iterator[Callable[..., RunningWatcher]]:
    with watchers() as start:
        yield start


def backdate(database_url: str, inbox: Path, seconds: float) -> None:
    """What a watcher frozen for ``seconds`` leaves: a beat that old by the database's clock."""
    with engines.get_engine(database_url).begin() as conn:
        conn.execute(
            update(Watcher)
            .where(col(Watcher.inbox) == str(inbox))
            .values(heartbeat_at=leases.seconds_ago(seconds))
        )


def test_a_taken_over_lock_is_lost_to_its_old_holder(database_url: str, tmp_path: Path) -> None:
    engine = engines.get_engine(database_url)
    inbox = str(tmp_path / "inbox")
    first = leases.take_inbox(engine, inbox=inbox, host="a", pid=1, stale_after=timedelta(seconds=15))
    assert first is not None
    assert leases.take_inbox(engine, inbox=inbox, host="b", pid=2, stale_after=timedelta(seconds=15)) is None
    backdate(database_url, Path(inbox), 60)
    second = leases.take_inbox(engine, inbox=inbox, host="b", pid=2, stale_after=timedelta(seconds=15))
    assert second is not None and second.id == first.id
    # The old holder wakes up: its beat and its release change nothing of the new holder's row.
    assert not leases.renew(engine, first)
    assert not leases.release(engine, first)
    assert leases.renew(engine, second)
    assert leases.holder(engine, inbox) == "pid 2 on b"


def test_one_watcher_per_inbox_and_one_that_lost_its_lock_stops(
    sqlite_url: str,
    service_for: Callable[[str], Service],
    start_watcher: Callable[..., RunningWatcher],
    tmp_path: Path,
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    service = service_for(sqlite_url)
    first = start_watcher(service, inbox)
    second = start_watcher(service, inbox)
    wait_until(lambda: not second.thread.is_alive(), timeout=20, what="the second watcher to refuse")
    assert isinstance(second.error, JoycapError) and "already active" in str(second.error)
    assert first.alive()
    # Another watcher takes the lock over (as after a stall of the first past the lock's life).
    engine = engines.get_engine(sqlite_url)
    taken: list[leases.Lease] = []

    def take_over() -> bool:
        backdate(sqlite_url, inbox, 60)
        lease = leases.take_inbox(
            engine, inbox=str(inbox), host="other", pid=2, stale_after=timedelta(seconds=15)
        )
        taken.extend([lease] if lease else [])
        return bool(taken)

    wait_until(take_over, timeout=20, what="the takeover")
    wait_until(lambda: not first.thread.is_alive(), timeout=20, what="the first watcher to stop")
    assert isinstance(first.error, JoycapError) and "lost the lock" in str(first.error)
    # Its stop released nothing of the new holder's.
    assert leases.renew(engine, taken[0])
