"""Time limits, which Celery's threads pool never enforces, enforced by the worker itself.

A real worker on the tiny model gets a job whose caption is forced to 20,000 new tokens: far
past a 10 s limit on any machine. The job must fail with the reason at the limit (its attempt
counted), and the generate call still running past it must end the worker, so that a live
worker's heartbeat never covers a hung model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from joycap_queue.captions.prompts import CaptionOptions
from joycap_queue.intake.enqueue import CaptionRequest, enqueue_images
from tests.support.jobs import jobs_in
from tests.support.services import Service, wait_until
from worker.batcher import EXIT_OVERRUN

RUNAWAY = {"greedy": True, "max_new_tokens": 20_000, "min_new_tokens": 20_000}


@pytest.mark.parametrize("engine", ["continuous", "generate"])
def test_a_caption_past_the_time_limit_fails_and_the_overrun_ends_the_worker(
    engine: str,
    sqlite_url: str,
    service_for: Callable[[str], Service],
    image_factory: Callable[..., list[Path]],
    tmp_path: Path,
) -> None:
    [image] = image_factory(tmp_path / "in", 1)
    service = service_for(sqlite_url)
    service.env.update(JOYCAP_TASK_TIME_LIMIT_S="10", JOYCAP_VISIBILITY_TIMEOUT_S="600")
    worker = service.start_worker("--engine", engine)
    settings = service.settings()
    request = CaptionRequest(
        profile="beta-one", model=settings.model, options=CaptionOptions(), gen_params=RUNAWAY
    )
    assert enqueue_images([image], request, settings).queued == 1
    wait_until(lambda: jobs_in(sqlite_url)[0].status == "failed", timeout=60, what="the job to time out")
    [job] = jobs_in(sqlite_url)
    assert job.error == "timed out after 10 s"
    assert job.attempts == 1
    wait_until(lambda: worker.process.poll() is not None, timeout=60, what="the overrunning worker to exit")
    assert worker.process.returncode == EXIT_OVERRUN
    assert "past the 10 s time limit" in worker.log()
