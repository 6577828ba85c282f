"""Reading `joycap.caption` messages where kombu's Redis transport keeps them.

Waiting messages sit in one list per priority step; delivered, unacknowledged ones in the
`unacked` hash. `requeue` reads both to know which jobs still have a live message, `cancel` to
take messages out or revoke them.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from joycap_queue.messaging.app import CAPTION_TASK, queues_key


@dataclass(frozen=True)
class CaptionMessage:
    job_id: int
    task_id: str | None
    raw: bytes
    # The delivery tag of a held (delivered, unacknowledged) message; None for a waiting one.
    tag: str | None = None


def caption_job_of(message: dict[str, Any]) -> tuple[int | None, str | None]:
    """(job id, task id) of a `joycap.caption` envelope; (None, None) for anything else."""
    try:
        headers = message.get("headers") or {}
        if headers.get("task") != CAPTION_TASK:
            return None, None
        body = message.get("body") or ""
        if (message.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        job_id = json.loads(body)[0][0]
    except (ValueError, TypeError, IndexError, KeyError, AttributeError):
        return None, None
    if not isinstance(job_id, int) or isinstance(job_id, bool):
        return None, None
    return job_id, headers.get("id")


def routed_queues(channel: Any, queue: str) -> list[str]:
    """The base queue and every model queue under it that messages were sent to."""
    members = channel.client.smembers(queues_key(queue))
    return [queue, *sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)]


def waiting_messages(channel: Any, queue: str) -> Iterator[tuple[bytes, CaptionMessage]]:
    """(list key, message) for every caption message waiting under the base queue ``queue``
    (in it and in its model queues), at every priority."""
    client = channel.client
    for name, priority in [(q, p) for q in routed_queues(channel, queue) for p in channel.priority_steps]:
        key = channel._q_for_pri(name, priority)
        start = 0
        # Workers pop from the right while this reads from the left, so nothing is skipped.
        while chunk := client.lrange(key, start, start + 999):
            for raw in chunk:
                try:
                    job_id, task_id = caption_job_of(json.loads(raw))
                except ValueError:
                    continue
                if job_id is not None:
                    yield key, CaptionMessage(job_id, task_id, raw)
            start += len(chunk)


def held_messages(channel: Any, queue: str) -> Iterator[CaptionMessage]:
    """Caption messages of the base queue ``queue`` (or its model queues) delivered to a worker
    and not yet acknowledged."""
    queues = set(routed_queues(channel, queue))
    for tag, payload in channel.client.hscan_iter(channel.unacked_key):
        try:
            message, _exchange, routing_key = json.loads(payload)
        except (ValueError, TypeError):
            continue
        if routing_key not in queues:
            continue
        job_id, task_id = caption_job_of(message)
        if job_id is not None:
            yield CaptionMessage(job_id, task_id, payload, tag.decode() if isinstance(tag, bytes) else tag)


def restore_held(channel: Any, tag: str) -> None:
    """Put a held message back at the head of its queue now, as kombu does after the visibility
    timeout: one Redis transaction takes it out of `unacked` and pushes it back."""
    channel.qos.restore_by_tag(tag)
