"""The Celery app as the light side sees it: configured from settings, sending tasks by name.

Nothing here imports the worker, so `submit` and the watcher never pay for torch.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import uuid
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from celery import Celery
from celery.events.event import Event
from celery.utils.time import utcoffset
from kombu.exceptions import OperationalError as KombuOperationalError
from kombu.utils import json as kombu_json
from redis.exceptions import RedisError

from joycap_queue.config import Settings, mask_url
from joycap_queue.errors import OptionError, ServiceUnavailable

CAPTION_TASK = "joycap.caption"
SUPPORTED_SCHEMES = ("redis://", "rediss://", "redis+socket://")
# Messages per Redis round trip when sending.
PIPELINE = 1000


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


def model_queue(queue: str, model: str) -> str:
    """The queue of one model's jobs, under the base queue ``queue``: ``joycap.m-<name>-<hash>``.

    Jobs are routed by the model they ask for and a worker consumes its own model's queue, so a
    worker started with another model never takes them (it used to fail every one, an attempt
    counted each). The hash is of the exact model string a job row holds (a hub id, or a
    folder's absolute path); the name part is only for people reading Flower.
    """
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", model.rstrip("/").rsplit("/", 1)[-1]).strip("-")[:40]
    return f"{queue}.m-{name or 'model'}-{hashlib.sha256(model.encode('utf-8')).hexdigest()[:10]}"


def queues_key(queue: str) -> str:
    """The Redis set naming every model queue under ``queue`` that a message was sent to."""
    return f"joycap:queues:{queue}"


def send_by_model(app: Celery, jobs: Iterable[tuple[int, str]], *, queue: str) -> int:
    """``send_caption_jobs`` for (job id, model) pairs, each to its model's queue."""
    by_model: dict[str, list[int]] = defaultdict(list)
    for job_id, model in jobs:
        by_model[model].append(job_id)
    return sum(send_caption_jobs(app, ids, queue=queue, model=model) for model, ids in by_model.items())


def send_caption_jobs(app: Celery, job_ids: Iterable[int], *, queue: str, model: str | None = None) -> int:
    """Publish one `joycap.caption` message per job, pipelined; returns the count.

    With ``model``, to that model's queue under ``queue`` (``model_queue``), where the workers
    of that model take it; without, to ``queue`` itself, which every worker also reads (messages
    from before routing; a worker hands one for another model on to its model's queue).
    The message carries only the job id: everything else is read from the job row.

    Celery's ``send_task`` spends about 150 µs of Python per message (routing, declaring the
    queue again, kombu's retry wrappers), which caps a 100,000-file submit near 3,000 files/s.
    Here Celery builds one message (``create_task_message``, its own protocol-2 headers) and
    kombu's envelope is filled in per job and pushed with ``LPUSH`` in pipelines of
    ``PIPELINE`` messages, exactly where kombu's Redis transport puts them, each with its
    ``task-sent`` event for Flower, published where kombu publishes events.
    tests/test_queue_messages.py holds messages and events to what ``send_task`` writes, so a
    Celery or kombu upgrade that changes them fails there.
    """
    ids = list(job_ids)
    sent = 0
    if not ids:
        return 0
    target = model_queue(queue, model) if model else queue
    try:
        with app.producer_or_acquire() as producer:
            producer.maybe_declare(app.amqp.queues[target])
            messages = _TaskMessages(app, producer.channel, target)
            events = bool(app.conf.task_send_sent_event)
            with producer.channel.conn_or_acquire() as client:
                if target != queue:
                    # Where `requeue`, `cancel` and the recovery sweep look for messages.
                    client.sadd(queues_key(queue), target)
                for start in range(0, len(ids), PIPELINE):
                    pipe = client.pipeline(transaction=False)
                    for job_id in ids[start : start + PIPELINE]:
                        task_id = str(uuid.uuid4())
                        pipe.lpush(messages.key, messages.envelope(job_id, task_id))
                        if events:
                            event = messages.sent_event(job_id, task_id)
                            for topic in messages.event_topics:
                                pipe.publish(topic, event)
                    pipe.execute()
                    sent += len(ids[start : start + PIPELINE])
    except (KombuOperationalError, OSError, RedisError) as exc:
        url = mask_url(str(app.conf.broker_url))
        raise ServiceUnavailable(f"lost Redis at {url} after sending {sent} jobs: {exc}") from None
    return sent


class _TaskMessages:
    """kombu Redis envelopes for `joycap.caption` messages and their `task-sent` events, from
    one message Celery built and the event dispatcher Celery would use."""

    def __init__(self, app: Celery, channel: Any, queue: str) -> None:
        # The arguments send_task passes; tests/test_queue_messages.py compares the two.
        template = app.amqp.create_task_message(
            "", CAPTION_TASK, [0], {}, create_sent_event=True, ignore_result=None, reply_to=app.thread_oid
        )
        self.headers = dict(template.headers)
        self.properties = dict(template.properties)
        self.embed = template.body[2]
        self.queue = queue
        # Priority 0 is the queue's own list; kombu names the others after it.
        self.key = channel._q_for_pri(queue, 0)
        dispatcher = app.amqp._event_dispatcher
        self.clock = dispatcher.clock
        self.event_fields = dict(
            template.sent_event or {},
            hostname=dispatcher.hostname,
            utcoffset=utcoffset(),
            pid=dispatcher.pid,
            queue=queue,
            exchange="",
            routing_key=queue,
        )
        self.event_headers = dict(dispatcher.headers)
        self.event_properties = {
            "delivery_mode": dispatcher.delivery_mode,
            "delivery_info": {"exchange": dispatcher.exchange.name, "routing_key": "task.sent"},
            "priority": 0,
            "body_encoding": "base64",
        }
        self.event_topics = channel._get_publish_topics(dispatcher.exchange.name, "task.sent")

    def envelope(self, job_id: int, task_id: str) -> str:
        body = json.dumps([[job_id], {}, self.embed]).encode("utf-8")
        message = {
            "body": base64.b64encode(body).decode("ascii"),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": dict(self.headers, id=task_id, root_id=task_id, argsrepr=repr([job_id])),
            "properties": dict(
                self.properties,
                correlation_id=task_id,
                priority=0,
                body_encoding="base64",
                delivery_tag=str(uuid.uuid4()),
                delivery_info={"exchange": "", "routing_key": self.queue},
                delivery_mode=2,
            ),
        }
        return kombu_json.dumps(message)

    def sent_event(self, job_id: int, task_id: str) -> str:
        event = Event(
            "task-sent",
            self.event_fields,
            uuid=task_id,
            root_id=task_id,
            args=repr([job_id]),
            clock=self.clock.forward(),
        )
        message = {
            "body": base64.b64encode(kombu_json.dumps(event).encode("utf-8")).decode("ascii"),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": self.event_headers,
            "properties": dict(self.event_properties, delivery_tag=str(uuid.uuid4())),
        }
        return kombu_json.dumps(message)
