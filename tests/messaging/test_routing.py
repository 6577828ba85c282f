"""Jobs are routed by model: a worker with another model never takes (or fails) them.

A misconfigured worker used to fail, and count an attempt for, every job that asked for
another model. Now each model has its own queue under the service's queue; a worker consumes
its own model's queue and the shared one, where only messages from before routing wait, and
hands any job for another model found there on to that model's queue, uncounted.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from joycap_queue.config import DEFAULT_MODEL
from joycap_queue.messaging.app import make_celery, model_queue, send_caption_jobs
from tests.support.jobs import jobs_in
from tests.support.services import Service, caption_queues, message_count, wait_until


def test_a_worker_with_another_model_leaves_the_jobs_alone(
    sqlite_url: str,
    service_for: Callable[[str], Service],
    image_factory: Callable[..., list[Path]],
    tmp_path: Path,
) -> None:
    image_factory(tmp_path / "real", 3)
    image_factory(tmp_path / "tiny", 2, seed=9)
    service = service_for(sqlite_url)
    settings = service.settings()
    service.call("submit", str(tmp_path / "real"), "--model", DEFAULT_MODEL)
    service.call("submit", str(tmp_path / "tiny"))
    assert set(caption_queues(settings)) == {
        settings.queue,
        model_queue(settings.queue, DEFAULT_MODEL),
        model_queue(settings.queue, settings.model),
    }
    worker = service.start_worker()
    # The tiny model's jobs are captioned; the real model's are not touched: still queued,
    # no attempt counted, their messages still waiting for a worker of that model.
    wait_until(
        lambda: (
            sorted(job.status for job in jobs_in(sqlite_url))
            == ["done", "done", "queued", "queued", "queued"]
        ),
        timeout=120,
        what="the tiny model's jobs",
    )
    real = [job for job in jobs_in(sqlite_url) if job.model == DEFAULT_MODEL]
    assert [(job.status, job.attempts, job.error) for job in real] == [("queued", 0, None)] * 3
    assert message_count(settings) == 3

    # A message from before routing, in the shared queue, for the real model: the tiny worker
    # takes it, hands it on to the real model's queue and counts nothing.
    import redis

    client = redis.Redis.from_url(settings.broker_url)
    client.delete(model_queue(settings.queue, DEFAULT_MODEL))
    send_caption_jobs(make_celery(settings), [real[0].id or 0], queue=settings.queue)
    wait_until(
        lambda: (
            client.llen(model_queue(settings.queue, DEFAULT_MODEL)) == 1 and client.llen(settings.queue) == 0
        ),
        timeout=60,
        what="the old message to be handed on",
    )
    again = {job.id: job for job in jobs_in(sqlite_url)}[real[0].id]
    assert (again.status, again.attempts, again.error) == ("queued", 0, None)
    assert "handed on to that model's queue" in worker.log()
    assert worker.process.poll() is None
