"""Hostile inputs to a real worker: paths outside the allowed roots, pickled messages, and a
broker that lost its messages while no worker ran; secrets kept from children and from output."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import update
from sqlmodel import Session

from joycap_queue.config import Settings, mask_url, settings_environment
from joycap_queue.messaging.app import CAPTION_TASK, make_celery, send_caption_jobs
from joycap_queue.store import engines, jobstate
from joycap_queue.store.models import Job, utcnow
from tests.support.jobs import all_finished, jobs_in
from tests.support.processes import children_of, environ_of
from tests.support.services import Service, drop_messages, wait_until


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
    with Session(engines.get_engine(sqlite_url)) as session:
        ids = jobstate.insert_jobs(session, [{**row, "model": model} for row in rows])
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
    drop_messages(settings)  # the JSON messages go; the jobs get one pickled, one JSON message
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
    drop_messages(settings)  # Redis lost everything
    with Session(engines.get_engine(sqlite_url)) as session:
        session.execute(update(Job).values(queued_at=utcnow() - timedelta(hours=1)))
        session.commit()
    service.start_worker()
    wait_until(all_finished(sqlite_url, 3), timeout=120, what="requeued jobs")
    assert {job.status for job in jobs_in(sqlite_url)} == {"done"}


FLOWER_SECRET, OPENAI_SECRET, QUERY_SECRET = "flower-pw-9f3a", "sk-openai-77c1", "pg-pw-5d20"


def test_a_worker_hands_its_children_no_secret_they_do_not_need(
    sqlite_url: str, service_for: Callable[[str], Service]
) -> None:
    service = service_for(sqlite_url)
    # From the user's shell: a worker process inherits them, but a worker needs neither Flower's
    # password nor, with the transformers backend, the OpenAI key; its children must not get them.
    service.env.update(JOYCAP_FLOWER_USER="me", JOYCAP_FLOWER_PASSWORD=FLOWER_SECRET)
    service.env["JOYCAP_OPENAI_API_KEY"] = OPENAI_SECRET
    parent = service.start_worker("--gpus", "0", "-b", "1", "-c", "1", name="w")
    [child] = children_of(parent.process.pid)
    environment = environ_of(child)
    assert environment["JOYCAP_QUEUE"] == service.env["JOYCAP_QUEUE"]  # what it needs, it has
    assert environment["JOYCAP_DATABASE_URL"] == sqlite_url
    raw = Path(f"/proc/{child}/environ").read_bytes()
    assert FLOWER_SECRET.encode() not in raw and OPENAI_SECRET.encode() not in raw


def test_each_child_role_gets_only_its_own_secrets() -> None:
    settings = Settings(
        database_url=f"postgresql+psycopg://joycap:{QUERY_SECRET}@db/joycap",
        flower_user="me",
        flower_password=FLOWER_SECRET,
        openai_api_key=OPENAI_SECRET,
    )
    worker = settings_environment(settings)
    assert FLOWER_SECRET not in worker.values() and OPENAI_SECRET not in worker.values()
    # Empty, not absent: a child's environment is the parent's with these laid over it.
    assert worker["JOYCAP_FLOWER_PASSWORD"] == worker["JOYCAP_OPENAI_API_KEY"] == ""
    assert worker["JOYCAP_DATABASE_URL"] == settings.database_url
    remote = settings_environment(settings.model_copy(update={"backend": "openai"}))
    assert remote["JOYCAP_OPENAI_API_KEY"] == OPENAI_SECRET and FLOWER_SECRET not in remote.values()
    flower = settings_environment(settings, "flower")
    assert flower["JOYCAP_BROKER_URL"] == settings.broker_url
    assert not any(
        secret in value
        for value in flower.values()
        for secret in (FLOWER_SECRET, OPENAI_SECRET, QUERY_SECRET)
    )


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        (
            f"postgresql+psycopg://joycap@db:5432/joycap?password={QUERY_SECRET}&sslmode=require",
            "postgresql+psycopg://joycap@db:5432/joycap?password=***&sslmode=require",
        ),
        (f"redis://cache:6379/0?password={QUERY_SECRET}", "redis://cache:6379/0?password=***"),
        (
            f"https://api.example/v1?model=x&api_key={QUERY_SECRET}",
            "https://api.example/v1?model=x&api_key=***",
        ),
        (
            f"postgresql://u:{QUERY_SECRET}@db/x?sslpassword={QUERY_SECRET}&options=-csearch_path%3Ds",
            "postgresql://u:***@db/x?sslpassword=***&options=-csearch_path%3Ds",
        ),
        (f"redis://db/0?Pass%77ord={QUERY_SECRET}", "redis://db/0?Pass%77ord=***"),
        ("postgresql://db/x?sslmode=require", "postgresql://db/x?sslmode=require"),
    ],
)
def test_mask_url_hides_secrets_in_query_strings(url: str, masked: str) -> None:
    assert mask_url(url) == masked
