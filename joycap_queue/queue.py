"""The Celery app as the light side sees it: configured from settings, sending tasks by name.

Nothing here imports the worker, so `submit` and the watcher never pay for torch.
"""

from __future__ import annotations

from collections.abc import Iterable

from celery import Celery
from kombu.exceptions import OperationalError as KombuOperationalError

from joycap_queue.config import Settings, mask_url
from joycap_queue.errors import OptionError, ServiceUnavailable

CAPTION_TASK = "joycap.caption"
SUPPORTED_SCHEMES = ("redis://", "rediss://", "redis+socket://")


def celery_config(settings: Settings) -> dict[str, object]:
    return {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout_s},
        # Results live in the database; a result backend would only duplicate them in Redis.
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": settings.queue,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": settings.task_time_limit_s,
        "task_soft_time_limit": max(1, settings.task_time_limit_s - 30),
        # Events feed Flower's per-task view and its /metrics.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "broker_connection_timeout": 5,
    }


def check_broker_url(url: str) -> None:
    if not url.startswith(SUPPORTED_SCHEMES):
        raise OptionError(
            "broker_url",
            f"unsupported broker URL {mask_url(url)}: use redis://, rediss:// or redis+socket://",
        )


def make_celery(settings: Settings) -> Celery:
    check_broker_url(settings.broker_url)
    app = Celery("joycap")
    app.conf.update(celery_config(settings))
    return app


def ping_broker(app: Celery) -> None:
    """Fail fast, with one line, when Redis is unreachable, before anything is written."""
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=5)
    except (KombuOperationalError, OSError) as exc:
        url = mask_url(str(app.conf.broker_url))
        raise ServiceUnavailable(f"cannot reach Redis at {url}: {exc}") from None


def send_caption_jobs(app: Celery, job_ids: Iterable[int], *, queue: str) -> int:
    """Publish one `joycap.caption` message per job over one pooled connection; returns the count.

    The message carries only the job id: everything else is read from the job row.
    """
    sent = 0
    try:
        with app.producer_or_acquire() as producer:
            for job_id in job_ids:
                app.send_task(CAPTION_TASK, args=[job_id], queue=queue, producer=producer)
                sent += 1
    except (KombuOperationalError, OSError) as exc:
        url = mask_url(str(app.conf.broker_url))
        raise ServiceUnavailable(f"lost Redis at {url} after sending {sent} jobs: {exc}") from None
    return sent
