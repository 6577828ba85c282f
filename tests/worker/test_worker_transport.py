"""The worker's Redis transport shortcuts (worker/transport.py) keep kombu's guarantees.

Deliveries are taken and filed as unacknowledged by one Lua script, several at a time, and the
acks of one loop pass leave together. Through a real worker: every message is delivered once,
every ack lands (nothing is left in the unacked hash or index), and a worker killed with
messages taken along loses none of them.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import redis

from tests.support.jobs import jobs_in
from tests.support.services import Service, wait_until


def test_deliveries_taken_along_are_captioned_once_and_all_acked(
    service_for: Callable[[str], Service],
    sqlite_url: str,
    image_factory: Callable[..., list[Path]],
    tmp_path: Path,
) -> None:
    image_factory(tmp_path / "images", 60)
    service = service_for(sqlite_url)
    client = redis.Redis.from_url(service.settings().broker_url)
    client.delete("unacked", "unacked_index")
    service.cli("submit", str(tmp_path / "images"))
    worker = service.start_worker("--backend", "null", "-b", "8", "-c", "8")
    wait_until(
        lambda: [j.status for j in jobs_in(sqlite_url)] == ["done"] * 60, timeout=120, what="all 60 jobs"
    )
    # One delivery each: a second delivery of a job would be refused at the claim and logged.
    assert [j.attempts for j in jobs_in(sqlite_url)] == [1] * 60
    assert "skipped: job is already" not in worker.log()
    wait_until(
        lambda: client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0,
        timeout=30,
        what="every ack to reach Redis",
    )


def test_a_killed_worker_loses_none_of_the_messages_it_took_along(
    service_for: Callable[[str], Service],
    sqlite_url: str,
    image_factory: Callable[..., list[Path]],
    tmp_path: Path,
) -> None:
    image_factory(tmp_path / "images", 24)
    service = service_for(sqlite_url)
    client = redis.Redis.from_url(service.settings().broker_url)
    client.delete("unacked", "unacked_index")
    service.cli("submit", str(tmp_path / "images"))
    # The tiny model, slow enough that the worker holds messages it took along when it dies.
    first = service.start_worker("-b", "2", "-c", "6", name="first")
    wait_until(lambda: client.hlen("unacked") >= 3, timeout=60, what="messages taken along")
    os.killpg(first.process.pid, signal.SIGKILL)
    first.process.wait()
    service.start_worker(name="second")
    wait_until(
        lambda: [j.status for j in jobs_in(sqlite_url)] == ["done"] * 24, timeout=180, what="all 24 jobs"
    )
