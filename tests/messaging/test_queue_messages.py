"""`send_caption_jobs` writes, in pipelines, the very messages Celery's `send_task` would write."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import redis

from joycap_queue.config import Settings
from joycap_queue.messaging.app import CAPTION_TASK, make_celery, send_caption_jobs
from joycap_queue.ops.services import RedisServer

PER_MESSAGE = {
    ("headers", "id"),
    ("headers", "root_id"),
    ("properties", "correlation_id"),
    ("properties", "delivery_tag"),
}


def without_ids(message: dict[str, Any]) -> dict[str, Any]:
    stripped = json.loads(json.dumps(message))
    for section, key in PER_MESSAGE:
        assert stripped[section].pop(key)
    stripped["headers"].pop("origin")  # "gen<pid>@host": the same here, but not our concern
    return stripped


def test_pipelined_messages_equal_send_task_messages(redis_server: RedisServer, tmp_path: Any) -> None:
    queue = f"test-msg-{uuid.uuid4().hex[:8]}"
    app = make_celery(Settings(broker_url=redis_server.url, queue=queue, data_dir=tmp_path))
    client = redis.Redis.from_url(redis_server.url)
    app.send_task(CAPTION_TASK, args=[41], queue=queue)
    assert send_caption_jobs(app, [41, 42, 43], queue=queue) == 3
    # LPUSH puts the newest first; workers pop from the other end.
    reference, *ours = [json.loads(raw) for raw in reversed(client.lrange(queue, 0, -1))]
    assert len(ours) == 3
    assert without_ids(ours[0]) == without_ids(reference)
    assert [json.loads(base64.b64decode(m["body"]))[0] for m in ours] == [[41], [42], [43]]
    assert [m["headers"]["argsrepr"] for m in ours] == ["[41]", "[42]", "[43]"]
    assert len({m["headers"]["id"] for m in ours}) == 3
    assert all(
        m["headers"]["id"] == m["headers"]["root_id"] == m["properties"]["correlation_id"] for m in ours
    )
    assert send_caption_jobs(app, [], queue=queue) == 0


def test_sent_events_equal_the_dispatchers(redis_server: RedisServer, tmp_path: Any) -> None:
    queue = f"test-ev-{uuid.uuid4().hex[:8]}"
    app = make_celery(Settings(broker_url=redis_server.url, queue=queue, data_dir=tmp_path))
    client = redis.Redis.from_url(redis_server.url)
    listener = client.pubsub()
    listener.psubscribe("*celeryev*")
    listener.get_message(timeout=2)
    app.send_task(CAPTION_TASK, args=[7], queue=queue)
    send_caption_jobs(app, [7, 8], queue=queue)
    events = []
    while (message := listener.get_message(timeout=2)) is not None:
        if message["type"] == "pmessage":
            envelope = json.loads(message["data"])
            envelope["body"] = json.loads(base64.b64decode(envelope["body"]))
            events.append((message["channel"], envelope))
    listener.close()
    assert len(events) == 3 and len({channel for channel, _ in events}) == 1
    reference, *ours = [envelope for _, envelope in events]

    def comparable(envelope: dict[str, Any]) -> dict[str, Any]:
        copied = json.loads(json.dumps(envelope))
        for key in ("uuid", "root_id", "clock", "timestamp", "hostname", "pid"):
            copied["body"].pop(key)
        copied["properties"].pop("delivery_tag")
        copied["headers"].pop("hostname")
        return copied

    assert comparable(ours[0]) == comparable(reference)
    assert [(e["body"]["type"], e["body"]["args"], e["body"]["queue"]) for e in ours] == [
        ("task-sent", "[7]", queue),
        ("task-sent", "[8]", queue),
    ]
    assert ours[1]["body"]["clock"] > ours[0]["body"]["clock"] > reference["body"]["clock"]
    task_ids = [json.loads(raw)["headers"]["id"] for raw in reversed(client.lrange(queue, 0, -1))][1:]
    assert [e["body"]["uuid"] for e in ours] == task_ids
