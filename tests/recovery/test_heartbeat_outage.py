"""A worker's heartbeat thread outlives a database outage: the worker is never judged dead for good."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
from sqlmodel import Session, select

from joycap_queue.store import engines
from joycap_queue.store.models import Endpoint
from tests.support.jobs import all_finished, jobs_in
from tests.support.netproxy import CuttableProxy
from tests.support.services import Service, postgres_address, through, wait_until

HEARTBEAT_S = 1.0  # stale after 4 beats: 4 s
OUTAGE_S = 8.0  # twice the stale time


class RefusingProxy(CuttableProxy):
    """A cut that refuses new connections at once.

    Closing the listener alone leaves the accept thread blocked on it, and the kernel keeps
    completing handshakes into its backlog: a new connection then hangs (no error, no timeout)
    instead of being refused, and so would the heartbeat. Shutting the listener down first
    wakes the accept thread and closes the port.
    """

    def cut(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
        super().cut()


def last_heartbeat(database_url: str) -> datetime | None:
    """The newest heartbeat of a worker row, read straight from PostgreSQL (never the proxy)."""
    with Session(engines.get_engine(database_url)) as session:
        rows = list(session.exec(select(Endpoint).where(Endpoint.kind == "worker")))
    return max((row.heartbeat_at for row in rows), default=None)


def heartbeat_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if "WARNING" in line and "heartbeat: " in line]


@pytest.mark.postgres
def test_the_heartbeat_thread_survives_a_database_outage_and_beats_again(
    postgres_url: str,
    service_for: Callable[[str], Service],
    image_factory: Callable[..., list[Path]],
    tmp_path: Path,
) -> None:
    proxy = RefusingProxy(postgres_address(postgres_url)).start()
    through_proxy = through(postgres_url, proxy.port)
    service = service_for(through_proxy)
    service.env["JOYCAP_WORKER_HEARTBEAT_S"] = str(HEARTBEAT_S)
    try:
        worker = service.start_worker()
        wait_until(lambda: last_heartbeat(postgres_url) is not None, timeout=30, what="the worker's row")
        # One beat written through the proxy, so the thread has been beating before the cut.
        first = last_heartbeat(postgres_url)
        wait_until(lambda: last_heartbeat(postgres_url) != first, timeout=30, what="a heartbeat")

        proxy.cut()
        cut_at = time.monotonic()
        try:
            wait_until(
                lambda: len(heartbeat_errors(worker.log())) >= 2,
                timeout=60,
                what="the heartbeat to meet database errors",
            )
            before = last_heartbeat(postgres_url)  # the last beat before the cut, none in flight now
            assert before is not None
            # The outage itself: longer than the stale time, several beats lost.
            time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - cut_at)))
            assert last_heartbeat(postgres_url) == before, "a beat got through a cut proxy"
        finally:
            proxy.resume()

        assert worker.process.poll() is None, worker.log()[-3000:]
        # Beating again: the row's heartbeat moves past the outage, then moves once more.
        wait_until(
            lambda: (beat := last_heartbeat(postgres_url)) is not None and beat > before,
            timeout=30,
            what="a heartbeat after the outage",
        )
        after = last_heartbeat(postgres_url)
        assert after is not None
        wait_until(
            lambda: (beat := last_heartbeat(postgres_url)) is not None and beat > after,
            timeout=30,
            what="the heartbeat to keep beating",
        )

        image_factory(tmp_path / "in", 1)
        service.cli("submit", str(tmp_path / "in"))
        wait_until(all_finished(postgres_url, 1), timeout=120, what="the job submitted after the outage")
        [job] = jobs_in(postgres_url)
        assert job.status == "done" and job.caption, (job.status, job.error, worker.log()[-3000:])
        assert worker.process.poll() is None

        log = worker.log()
        # Each failed beat is one logged line, and nothing escaped the thread.
        assert heartbeat_errors(log), log[-3000:]
        assert "Exception in thread" not in log, log[-3000:]
        lines, errors = log.splitlines(), set(heartbeat_errors(log))
        for i, line in enumerate(lines):
            if line in errors:
                assert i + 1 == len(lines) or not lines[i + 1].startswith("Traceback"), log[-3000:]
        worker.stop()
    finally:
        proxy.cut()
