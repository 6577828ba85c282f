"""One caption job from its id to its database row: claim, read, caption, store.

Every way a job can go wrong ends here as a failed row with a one-line reason; nothing escapes
to the worker, so one bad image never takes the worker or its batchmates down.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DataError, IntegrityError

from joycap_queue.captions.modelspec import spec_key
from joycap_queue.captions.prompts import system_prompt
from joycap_queue.captions.quality import CleanupRules
from joycap_queue.config import Settings, mask_url
from joycap_queue.errors import first_line
from joycap_queue.intake.images import ImageError, check_allowed, open_image_rgb, read_verified
from joycap_queue.results.sidecars import OutputOptions, finish_job_outputs
from joycap_queue.store import engines, jobstate
from joycap_queue.store.models import JobStatus
from worker.backends.base import CaptionInput, GenerationParams
from worker.batcher import CaptionService, HandedBack
from worker.completions import CompletionWriter
from worker.gate import Gate
from worker.quality_guard import caption_guarded, flags_json

log = logging.getLogger(__name__)


HANDED_BACK = "handed back"


@dataclass
class JobOutcome:
    job_id: int
    status: str
    detail: str = ""


def run_caption_job(
    job_id: int,
    *,
    engine: Engine,
    captioner: CaptionService,
    settings: Settings,
    worker_name: str,
    gate: Gate | None = None,
    writer: CompletionWriter | None = None,
) -> JobOutcome:
    """Caption one job; with a ``gate``, a job marked to run alone waits for an empty worker.

    With a ``writer``, the caption is stored in one transaction with the others finishing with it.
    """
    gate = gate or Gate()
    # One name for this delivery's claim, kept across its retries: a retry after a lost COMMIT
    # acknowledgement then knows the job it finds running as its own (jobstate.claim_job).
    claim_id = uuid.uuid4().hex

    def note_waiting() -> None:
        jobstate.receive_job(engine, job_id, worker=worker_name)

    def claim(alone: bool) -> jobstate.Claim:
        # On this thread, not the writer's: claims arrive one at a time, as Celery hands out
        # messages, so a group would hold one claim and cost a hand-over (measured: more CPU).
        call = functools.partial(
            jobstate.claim_job,
            engine,
            job_id,
            worker=worker_name,
            max_attempts=settings.max_attempts,
            alone=alone,
            claim_id=claim_id,
        )
        started = time.monotonic()
        try:
            # Nearly every claim succeeds at once: only one that did not builds the retry loop,
            # for what is left of the budget (a retry after a lost COMMIT knows its own claim).
            return call()
        except Exception as exc:
            if not engines.is_transient(exc):
                raise
            reason = mask_url(first_line(exc, driver=True))
            log.warning("database write failed (claim job %s): %s; retrying", job_id, reason)
        left_s = max(settings.db_retry_s - (time.monotonic() - started), 0.0)
        return engines.retrying(left_s, what=f"claim job {job_id}")(call)

    try:
        # Most jobs run with others; the claim itself says when this one must not, so no job
        # pays a read of its own before it is claimed.
        with gate.hold(alone=False, on_wait=note_waiting):
            first = claim(alone=False)
            if not first.run_alone:
                return _run(job_id, first, engine, captioner, settings, worker_name, writer, claim_id)
        with gate.hold(alone=True, on_wait=note_waiting):
            return _run(job_id, claim(alone=True), engine, captioner, settings, worker_name, writer, claim_id)
    except HandedBack:
        # Stopped while waiting its turn: never claimed, so only the note of holding it goes.
        jobstate.return_to_queue(engine, job_id, status=JobStatus.queued.value, worker=worker_name)
        return JobOutcome(job_id, HANDED_BACK)


def _run(
    job_id: int,
    claim: jobstate.Claim,
    engine: Engine,
    captioner: CaptionService,
    settings: Settings,
    worker_name: str,
    writer: CompletionWriter | None,
    claim_id: str,
) -> JobOutcome:
    if claim.job is None:
        log.info("job %s skipped: %s", job_id, claim.reason)
        if claim.gave_up:
            _finish_outputs(engine, job_id)
            return JobOutcome(job_id, "failed", claim.reason)
        return JobOutcome(job_id, "skipped", claim.reason)
    job = claim.job
    wants_outputs = OutputOptions.from_json(job.outputs).active  # most jobs ask for none
    started = time.monotonic()
    wanted = spec_key(job.model, job.quantize, job.adapter_hash)
    if wanted != captioner.serving_key:
        return _hand_on(engine, settings, job_id, wanted, worker_name)
    try:
        check_allowed(Path(job.path), settings.allowed_root_paths)
        data = read_verified(Path(job.path), job.content_hash)
        image = open_image_rgb(io.BytesIO(data), max_pixels=settings.max_image_pixels)
        params = GenerationParams(**json.loads(job.gen_params or "{}"))
        # Decoded here, on the task thread; the batcher prepares it here too, then waits for its
        # batch. A caption the quality guard flags is captioned again, up to quality_retries.
        guarded = caption_guarded(
            captioner,
            CaptionInput(image=image, prompt=job.prompt, system_prompt=system_prompt(job.profile)),
            params,
            caption_type=job.caption_type,
            cleanup=CleanupRules.from_json(job.cleanup),
            settings=settings,
        )
        output = guarded.output
    except HandedBack:
        # The worker is stopping: the job goes back uncounted, and the task hands its message back.
        jobstate.return_to_queue(
            engine,
            job_id,
            status=JobStatus.running.value,
            worker=worker_name,
            attempts=jobstate.give_back_attempt(),
        )
        log.info("job %s handed back: the worker is stopping", job_id)
        return JobOutcome(job_id, HANDED_BACK)
    except ImageError as exc:
        return _failed(engine, settings, job_id, str(exc), outputs=wants_outputs)
    except SoftTimeLimitExceeded:
        reason = f"timed out after {settings.task_time_limit_s} s"
        return _failed(engine, settings, job_id, reason, outputs=wants_outputs)
    except Exception as exc:  # noqa: BLE001 - a job failure is data; the worker must keep going
        log.exception("job %s: captioning failed", job_id)
        reason = first_line(f"captioning failed: {type(exc).__name__}: {exc}", strip=False)
        return _failed(engine, settings, job_id, reason, outputs=wants_outputs)
    completion = jobstate.Completion(
        job_id,
        job.prepend + guarded.caption + job.append,
        output.prompt_tokens,
        output.output_tokens,
        claim_id,
        raw_caption=None if guarded.raw is None else job.prepend + guarded.raw + job.append,
        quality=guarded.quality,
        caption_attempts=guarded.attempts,
        quality_flags=flags_json(guarded),
    )
    try:
        # The caption is computed: a database that is busy or restarting is waited for.
        if writer is not None:
            stored = writer.complete(completion)
        else:
            stored = engines.retrying(settings.db_retry_s, what=f"store the caption of job {job_id}")(
                jobstate.complete_jobs, engine, [completion]
            )[0]
    except (DataError, IntegrityError) as exc:
        # The database refuses this value for good; retrying cannot help, so the job fails.
        reason = first_line(exc, driver=True)
        return _failed(
            engine, settings, job_id, f"could not store the caption: {reason}", outputs=wants_outputs
        )
    elapsed = time.monotonic() - started
    if not stored:
        log.info("job %s already finished elsewhere; caption discarded", job_id)
        return JobOutcome(job_id, "skipped", "already finished")
    if guarded.quality != "ok":
        log.warning(
            "job %s: caption flagged %s after %d attempts (kept the least bad)",
            job_id,
            guarded.quality,
            guarded.attempts,
        )
    log.info("job %s done in %.2fs (%d tokens)", job_id, elapsed, output.output_tokens)
    if wants_outputs:  # the sidecars re-read the row: only for a job that asks for them
        _finish_outputs(engine, job_id)
    return JobOutcome(job_id, "done")


def _hand_on(engine: Engine, settings: Settings, job_id: int, model: str, worker_name: str) -> JobOutcome:
    """A job for another model (or quantization, or adapter: ``model`` is its ModelSpec key), from
    the shared queue: back to `queued` uncounted and on to its model's queue, for a worker that
    serves it. Never failed here."""
    from joycap_queue.messaging.app import make_celery, send_caption_jobs

    if jobstate.return_to_queue(
        engine,
        job_id,
        status=JobStatus.running.value,
        worker=worker_name,
        attempts=jobstate.give_back_attempt(),
    ):
        send_caption_jobs(make_celery(settings), [job_id], queue=settings.queue, model=model)
        log.info("job %s asks for model %s: handed on to that model's queue", job_id, model)
    return JobOutcome(job_id, "skipped", f"for model {model}")


def _failed(engine: Engine, settings: Settings, job_id: int, reason: str, *, outputs: bool) -> JobOutcome:
    log.warning("job %s failed: %s", job_id, reason)
    if (
        engines.retrying(settings.db_retry_s, what=f"record the failure of job {job_id}")(
            jobstate.fail_job, engine, job_id, reason
        )
        and outputs
    ):
        _finish_outputs(engine, job_id)
    return JobOutcome(job_id, "failed", reason)


def _finish_outputs(engine: Engine, job_id: int) -> None:
    # The result is already stored; a sidecar that cannot be written is logged, and the watcher
    # writes any missing sidecar of a done job on its next rescan.
    try:
        finish_job_outputs(engine, job_id)
    except OSError as exc:
        log.warning("job %s: sidecar or move failed: %s", job_id, exc)
