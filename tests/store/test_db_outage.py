"""PostgreSQL unreachable while a worker holds computed captions: it waits, then stores them."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.jobs import all_finished, jobs_in
from tests.support.netproxy import CuttableProxy
from tests.support.services import Service, postgres_address, through, wait_until


@pytest.mark.postgres
def test_worker_retries_its_writes_while_postgres_is_away(
    postgres_url: str,
    service_for: Callable[[str], Service],
    image_factory: Callable[..., list[Path]],
    tmp_path: Path,
) -> None:
    proxy = CuttableProxy(postgres_address(postgres_url)).start()
    through_proxy = through(postgres_url, proxy.port)
    image_factory(tmp_path / "in", 2)
    service = service_for(through_proxy)
    # The two jobs wait 20 s for batchmates, so their captions are computed only after the test
    # has cut the database (4 s was too short on a loaded machine: the captions got stored first).
    service.env["JOYCAP_BATCH_WAIT_MS"] = "20000"
    worker = service.start_worker("--engine", "generate", "-b", "8")
    service.cli("submit", str(tmp_path / "in"))
    wait_until(
        lambda: [job.status for job in jobs_in(postgres_url)] == ["running"] * 2,
        timeout=60,
        what="two claims",
    )
    proxy.cut()
    try:
        wait_until(lambda: "database write failed" in worker.log(), timeout=60, what="a failed write")
        time.sleep(3)  # more retries, with backoff
    finally:
        proxy.resume()
    wait_until(all_finished(postgres_url, 2), timeout=60, what="the captions to be stored")
    jobs = jobs_in(postgres_url)
    assert [(job.status, job.attempts) for job in jobs] == [("done", 1)] * 2
    assert all(job.caption for job in jobs)
    assert "store the caption of job" in worker.log()
    assert worker.process.poll() is None
    proxy.cut()
