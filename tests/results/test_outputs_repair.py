"""Repairs of a dead worker's outputs: they write what is missing and move nothing twice."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

from PIL import Image
from sqlmodel import Session, col, select

from joycap_queue.store import engines
from joycap_queue.store.models import Endpoint
from tests.support.jobs import jobs_in
from tests.support.services import Service, wait_until

HEARTBEAT = "0.5"  # dead after 2 s without a beat


def test_a_dead_workers_moved_image_is_not_moved_again_by_its_rescuer(
    sqlite_url: str, service_for: Callable[[str], Service], tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    (inbox / "album").mkdir(parents=True)
    Image.new("RGB", (32, 24), "teal").save(inbox / "album" / "a.png")
    Image.new("RGB", (24, 32), "olive").save(inbox / "album" / "b.png")
    service = service_for(sqlite_url)
    service.env["JOYCAP_WORKER_HEARTBEAT_S"] = HEARTBEAT
    first = service.start_worker(name="first")
    service.cli("submit", str(inbox), "--move", "--sidecar", "txt")
    done = inbox / "done" / "album"

    def finished_and_moved() -> bool:
        jobs = jobs_in(sqlite_url)
        return len(jobs) == 2 and all(job.status == "done" and job.path.startswith(str(done)) for job in jobs)

    # The row's path is the last thing the worker writes for a job: its outputs are all there.
    wait_until(finished_and_moved, timeout=60, what="both images captioned and moved")
    # Killed after finishing: its endpoint row stays, and the rescuer repairs the outputs of the
    # jobs it finished in its last moments, then removes the row.
    os.killpg(first.process.pid, signal.SIGKILL)
    first.process.wait(timeout=10)
    service.start_worker(name="rescuer")

    def first_is_forgotten() -> bool:
        with Session(engines.get_engine(sqlite_url)) as session:
            return not session.exec(select(Endpoint).where(col(Endpoint.url).startswith("first@"))).all()

    wait_until(first_is_forgotten, timeout=60, what="the rescuer to repair the dead worker's outputs")
    for job in jobs_in(sqlite_url):
        image = done / Path(job.path).name
        assert job.path == str(image) and image.exists()
        assert image.with_suffix(".txt").read_bytes().decode() == job.caption
    assert not (inbox / "done" / "done").exists()
    assert sorted(p.name for p in done.iterdir()) == ["a.png", "a.txt", "b.png", "b.txt"]
