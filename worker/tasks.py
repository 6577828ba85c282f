"""The Celery task: a thin shell that hands a job id to `run_caption_job` and the process's batcher."""

from __future__ import annotations

import logging
import socket

from celery import Task
from celery.exceptions import Reject

from joycap_queue.config import get_settings
from joycap_queue.messaging.app import CAPTION_TASK
from joycap_queue.store import engines
from worker.app import app
from worker.completions import get_completion_writer
from worker.jobs import HANDED_BACK, run_caption_job
from worker.runtime import get_batcher, get_gate

log = logging.getLogger(__name__)


@app.task(name=CAPTION_TASK, bind=True, ignore_result=True)
def caption(self: Task, job_id: object) -> str:
    if isinstance(job_id, bool) or not isinstance(job_id, int):
        # A message we did not write: reject it (acknowledged, logged), never crash on it.
        log.error("rejected malformed %s message: job id %r is not an integer", CAPTION_TASK, job_id)
        return "rejected"
    settings = get_settings()
    engine = engines.get_engine(settings.effective_database_url)
    outcome = run_caption_job(
        job_id,
        engine=engine,
        captioner=get_batcher(settings),
        settings=settings,
        worker_name=self.request.hostname or socket.gethostname(),
        gate=get_gate(),
        writer=get_completion_writer(engine, retry_s=settings.db_retry_s),
    )
    if outcome.status == HANDED_BACK:
        # The message goes back to the queue as it is (acks_late: it was never acknowledged).
        raise Reject("the worker is stopping", requeue=True)
    return outcome.status
