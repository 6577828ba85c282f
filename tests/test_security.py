"""Hostile inputs to a real worker: paths outside the allowed roots, pickled messages, and a
broker that lost its messages while no worker ran."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import redis
from PIL import Image
from sqlalchemy import update
from sqlmodel import Session

from joycap_queue import db
from joycap_queue.models import Job, utcnow
from joycap_queue.queue import CAPTION_TASK, make_celery, send_caption_jobs
from tests.conftest import Service, wait_until
from tests.test_pipeline import all_finished, jobs_in


def job_row(path: str, key: str) -> dict[str, object]:
    data = Path(path).read_bytes() if Path(path).exists() else b""
    return {
        "path": path,
        "content_hash": hashlib.sha256(data).hexdigest(),
        "profile": "beta-one",
        "prompt": "Write a detailed description for this image.",
        "model": "",
        "dedup_key": key,
    }


def test_worker_reads_only_below_the_allowed_roots(
    sqlite_url: str, service_for: Callable[[str], Service], tmp_path: Path
) -> None:
    inside = tmp_path / "in"
    inside.mkdir()
    Image.new("RGB", (30, 30), "red").save(inside / "ok.png")
    (tmp_path / "secret.png").write_bytes(b"outside")
    service = service_for(sqlite_url)
    service.env["JOYCAP_ALLOWED_ROOTS"] = str(inside)
    model = service.env["JOYCAP_MODEL"]
    rows = [
        job_row(str(inside / "ok.png"), "ok"),
        job_row("/etc/passwd", "passwd"),
        job_row(str(inside / ".." / "secret.png"), "dotdot"),
    ]
    with Session(db.get_engine(sqlite_url)) as session:
        ids = db.insert_jobs(session, [{**row, "model": model} for row in rows])
        session.commit()
    send_caption_jobs(make_celery(service.settings()), list(ids.values()), queue=service.env["JOYCAP_QUEUE"])
    service.start_worker()
    wait_until(all_finished(sqlite_url, 3), timeout=120, what="three jobs")
    by_key = {job.dedup_key: job for job in jobs_in(sqlite_url)}
    assert by_key["ok"].status == "done"
    for key in ("passwd", "dotdot"):
        assert by_key[key].status == "failed"
        assert by_key[key].error == "path is outside the allowed roots (JOYCAP_ALLOWED_ROOTS); not read"


def test_pickled_messages_are_refused_and_the_worker_goes_on(
    sqlite_url: str,
    service_for: Callable[[str], Service],
    image_factory: Callable[..., list[Path]],
    tmp_path: Path,
) -> None:
    image_factory(tmp_path / "in", 2)
    service = service_for(sqlite_url)
    settings = service.settings()
    service.cli("submit", str(tmp_path / "in"))
    client = redis.Redis.from_url(settings.broker_url)
    client.delete(settings.queue)  # the JSON messages go; the jobs get one pickled, one JSON message
    first, second = sorted(job.id for job in jobs_in(sqlite_url))
    app = make_celery(settings)
    app.conf.accept_content = ["json", "pickle"]  # the sender may say pickle; the worker must not listen
    app.send_task(CAPTION_TASK, args=[first], queue=settings.queue, serializer="pickle")
    worker = service.start_worker()
    send_caption_jobs(app, [second], queue=settings.queue)
    wait_until(
        lambda: {j.id: j.status for j in jobs_in(sqlite_url)}[second] == "done", timeout=120, what="json job"
    )
    assert {j.id: j.status for j in jobs_in(sqlite_url)}[first] == "queued"
    assert "pickle" in worker.log() and worker.process.poll() is None


def test_worker_start_requeues_what_redis_lost(
    sqlite_url: str,
    service_for: Callable[[str], Service],
    image_factory: Callable[..., list[Path]],
    tmp_path: Path,
) -> None:
    image_factory(tmp_path / "in", 3)
    service = service_for(sqlite_url)
    settings = service.settings()
    service.cli("submit", str(tmp_path / "in"))
    redis.Redis.from_url(settings.broker_url).delete(settings.queue)  # Redis lost everything
    with Session(db.get_engine(sqlite_url)) as session:
        session.execute(update(Job).values(queued_at=utcnow() - timedelta(hours=1)))
        session.commit()
    service.start_worker()
    wait_until(all_finished(sqlite_url, 3), timeout=120, what="requeued jobs")
    assert {job.status for job in jobs_in(sqlite_url)} == {"done"}
