"""The worker's shortcuts through Celery's and kombu's per-message work on Redis.

Each cuts a round trip (or a client, or an event flush) per message without changing what lands
in Redis: one client per channel, deliveries taken and filed as unacknowledged in one command,
one pass's acks sent together, task events flushed once per window. Only the worker process
installs them, before it consumes (``install_redis_shortcuts``).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger(__name__)


def install_redis_shortcuts() -> None:
    reuse_redis_clients()
    record_deliveries_in_one_command()
    batch_redis_acks()
    batch_task_events()


def reuse_redis_clients() -> None:
    """Let kombu's Redis channel reuse one ``redis.Redis`` client instead of building one per call.

    kombu builds a new client for every publish and every ack (``Channel.conn_or_acquire``); with
    redis-py 8 each costs about 0.15 ms of Python (its response-callback tables), and a task makes
    four or five: task events, the unacked index, the ack. The connection pool is shared anyway,
    and a client over a pool is thread-safe, so one client per channel (and pool) does the same
    work. Only the worker process calls this, before it consumes.
    """
    from kombu.transport import redis as kombu_redis
    from redis.exceptions import ConnectionError as RedisConnectionError

    original = kombu_redis.Channel._create_client
    if getattr(original, "reuses_clients", False):
        return

    def _create_client(self: Any, asynchronous: bool = False) -> Any:
        if asynchronous:
            return original(self, asynchronous=True)
        client = self.__dict__.get("_joycap_client")
        try:
            pool = self.pool
        except AttributeError as exc:
            # The channel's connection was closed under it (Redis went away): kombu then fails
            # with an AttributeError, which Celery treats as fatal and exits. As a connection
            # error it reconnects instead; a message whose ack is lost here is delivered again
            # and skipped (its job is finished).
            raise RedisConnectionError("the connection to Redis was closed") from exc
        if client is None or client.connection_pool is not pool:
            client = self.__dict__["_joycap_client"] = original(self)
        return client

    _create_client.reuses_clients = True  # type: ignore[attr-defined]
    kombu_redis.Channel._create_client = _create_client  # type: ignore[method-assign]


# What kombu's QoS.append does in a MULTI/EXEC pipeline (ZADD to the unacked index, HSET of the
# message into the unacked hash), as one atomic command; then, when there is room, the same for
# up to ARGV[4] more messages taken (RPOP) from the queue lists KEYS[3..], in BRPOP's order.
# A message it cannot read as kombu's goes back where it was (RPUSH) and kombu's BRPOP takes it.
_RECORD_DELIVERIES = """
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
local taken = {}
local want = tonumber(ARGV[4])
local i = 3
while want > 0 and i <= #KEYS do
  local item = redis.call('RPOP', KEYS[i])
  if not item then
    i = i + 1
  else
    local ok, msg = pcall(cjson.decode, item)
    local props = ok and type(msg) == 'table' and msg['properties']
    local info = type(props) == 'table' and props['delivery_info']
    local tag = type(props) == 'table' and props['delivery_tag']
    if type(tag) ~= 'string' or type(info) ~= 'table' or type(info['exchange']) ~= 'string'
        or type(info['routing_key']) ~= 'string' or redis.call('HEXISTS', KEYS[2], tag) == 1 then
      redis.call('RPUSH', KEYS[i], item)
      return taken
    end
    redis.call('ZADD', KEYS[1], ARGV[1], tag)
    redis.call('HSET', KEYS[2], tag,
      '[' .. item .. ',' .. cjson.encode(info['exchange']) .. ',' .. cjson.encode(info['routing_key']) .. ']')
    taken[#taken + 1] = KEYS[i]
    taken[#taken + 1] = item
    want = want - 1
  end
end
return taken
"""
# At most this many messages taken along with one BRPOP (never more than the prefetch room).
MAX_TAKEN_ALONG = 32


def record_deliveries_in_one_command() -> None:
    """Let kombu record a delivery in one command, and take the messages there is room for with it.

    kombu's Redis transport takes one message per BRPOP, and records each in the unacked index
    and hash with a MULTI/EXEC pipeline of its own: two round trips on the consumer's loop per
    message, with the loop thread waiting for the GIL again after each. Here the record of a
    message BRPOP returned is one Lua script (the same ZADD and HSET, to the same keys, with the
    same values, as atomically), and that script also takes, while Celery's prefetch limit
    leaves room, the next messages from the same queues in BRPOP's order and records them the
    same way. Those are delivered right after, as if BRPOP had returned each: a batch of acks
    that frees eight slots is refilled by one BRPOP and one script call instead of sixteen round
    trips. A message taken that way is in the unacked hash from the moment it leaves its list
    (kombu's own path has a gap between BRPOP and the record), so the visibility timeout and the
    restore of unacknowledged messages cover it exactly as they cover kombu's.

    A server that refuses scripts, or a global key prefix, gets kombu's own pipeline. Only the
    worker calls this.
    """
    from kombu.transport import redis as kombu_redis
    from kombu.transport import virtual
    from kombu.utils.encoding import bytes_to_str
    from kombu.utils.json import dumps, loads
    from redis.exceptions import NoScriptError, ResponseError

    original_append = kombu_redis.QoS.append
    if getattr(original_append, "records_in_one_command", False):
        return
    original_read = kombu_redis.Channel._brpop_read
    state: dict[str, Any] = {"sha": None, "refused": False}

    def append(self: Any, message: Any, delivery_tag: str) -> None:
        channel = self.channel
        recorded = channel.__dict__.get("_joycap_recorded")
        if recorded and delivery_tag in recorded:
            recorded.discard(delivery_tag)  # taken along by the script: recorded already
            virtual.QoS.append(self, message, delivery_tag)
            return None
        if state["refused"] or channel.global_keyprefix:
            return original_append(self, message, delivery_tag)
        keys = [self.unacked_index_key, self.unacked_key]
        room = 0
        if channel.__dict__.get("_joycap_reading") and self.prefetch_count:
            room = min(MAX_TAKEN_ALONG, (self.can_consume_max_estimate() or 0) - 1)
        if room > 0:
            queues = channel._queue_cycle.consume(len(channel.active_queues))
            keys += [channel._q_for_pri(queue, pri) for pri in channel.priority_steps for queue in queues]
        delivery = message.delivery_info
        record = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        args = (*keys, time.time(), delivery_tag, record, max(room, 0))
        with channel.conn_or_acquire() as client:
            try:
                if state["sha"] is None:
                    state["sha"] = client.script_load(_RECORD_DELIVERIES)
                try:
                    taken = client.evalsha(state["sha"], len(keys), *args)
                except NoScriptError:  # a restarted or another server: load it again
                    state["sha"] = client.script_load(_RECORD_DELIVERIES)
                    taken = client.evalsha(state["sha"], len(keys), *args)
            except ResponseError as exc:
                # Scripting refused (disabled, or a server without it): kombu's pipeline from now on.
                log.warning("Redis refused a Lua script (%s): recording deliveries kombu's way", exc)
                state["refused"] = True
                return original_append(self, message, delivery_tag)
        virtual.QoS.append(self, message, delivery_tag)
        if taken:
            along = channel.__dict__.setdefault("_joycap_along", [])
            recorded = channel.__dict__.setdefault("_joycap_recorded", set())
            for key, item in zip(taken[::2], taken[1::2], strict=True):
                payload = loads(bytes_to_str(item))
                recorded.add(payload["properties"]["delivery_tag"])
                along.append((bytes_to_str(key).rsplit(channel.sep, 1)[0], payload))
        return None

    def _brpop_read(self: Any, **options: Any) -> Any:
        self.__dict__["_joycap_reading"] = True
        try:
            result = original_read(self, **options)
        finally:
            self.__dict__["_joycap_reading"] = False
            along = self.__dict__.pop("_joycap_along", None)
        if along:
            _deliver_along(self, along)
        return result

    append.records_in_one_command = True  # type: ignore[attr-defined]
    kombu_redis.QoS.append = append  # type: ignore[method-assign]
    kombu_redis.Channel._brpop_read = _brpop_read  # type: ignore[method-assign]


def _deliver_along(channel: Any, along: list[tuple[str, Any]]) -> None:
    """Hand on the messages a delivery's record took along, as BRPOP hands on the one it read."""
    for index, (queue, payload) in enumerate(along):
        try:
            channel._queue_cycle.rotate(queue)
            channel.connection._deliver(payload, queue)
        except BaseException:
            # Not handed on (the consumer went away meanwhile): the ones after it go back to
            # their queue now; this one is in the unacked hash, back after the visibility timeout.
            recorded = channel.__dict__.get("_joycap_recorded", set())
            for _queue, rest in along[index:]:
                recorded.discard(rest["properties"]["delivery_tag"])
            # Pushed back to the end BRPOP takes from, the last first: their order is kept.
            for _queue, rest in reversed(along[index + 1 :]):
                channel.qos.restore_by_tag(rest["properties"]["delivery_tag"])
            raise


def batch_redis_acks() -> None:
    """Let kombu's Redis QoS remove the messages acknowledged in one loop pass in one round trip.

    Celery acknowledges on the consumer's loop (``call_soon``), and a batch of captions ends
    together, so its acks arrive in the same pass of the loop; kombu sends each as its own
    MULTI/EXEC pipeline (ZREM from the unacked index, HDEL from the unacked hash), one round
    trip per message. Here an ack made on the running loop's thread is noted at once in kombu's
    own bookkeeping (the prefetch slot frees as before) and its removal from Redis is sent in
    the same pass, before the loop next waits: one MULTI/EXEC of one ZREM and one HDEL for all
    of them. Anywhere else (no loop running on this thread) an ack is sent at once, as kombu
    does. Closing the channel sends whatever is still pending first.

    If that round trip fails, the messages stay in Redis's unacked hash and come back after the
    visibility timeout, as an ack lost with the connection does; their jobs are finished, and
    the claim skips them. Only the worker calls this.
    """
    from kombu.asynchronous import get_event_loop
    from kombu.transport import redis as kombu_redis
    from kombu.transport import virtual

    original_ack = kombu_redis.QoS.ack
    if getattr(original_ack, "batches_acks", False):
        return
    original_restore = kombu_redis.QoS.restore_unacked_once

    def ack(self: Any, delivery_tag: str) -> None:
        hub = get_event_loop()
        # A closing hub has dropped its readers before it runs its last callbacks: no tick
        # follows them, so their acks go at once.
        if hub is None or getattr(hub, "_loop_thread", None) != threading.get_ident() or not hub.readers:
            return original_ack(self, delivery_tag)
        pending = self.__dict__.setdefault("_joycap_acks", [])
        pending.append(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)
        if len(pending) == 1:
            # Run on this pass's tick, after the ready callbacks and before the loop polls.
            flush = self.__dict__.get("_joycap_flush")
            if flush is None:
                flush = self.__dict__["_joycap_flush"] = lambda: _flush_acks(self, hub)
            hub.on_tick.add(flush)
        return None

    def restore_unacked_once(self: Any, stderr: Any = None) -> Any:
        _send_acks(self)
        return original_restore(self, stderr)

    ack.batches_acks = True  # type: ignore[attr-defined]
    kombu_redis.QoS.ack = ack  # type: ignore[method-assign]
    kombu_redis.QoS.restore_unacked_once = restore_unacked_once  # type: ignore[method-assign]


def _flush_acks(qos: Any, hub: Any) -> None:
    hub.on_tick.discard(qos.__dict__.get("_joycap_flush"))
    _send_acks(qos)


def _send_acks(qos: Any) -> None:
    tags = qos.__dict__.pop("_joycap_acks", None)
    if not tags:
        return
    try:
        with qos.channel.conn_or_acquire() as client:
            client.pipeline().zrem(qos.unacked_index_key, *tags).hdel(qos.unacked_key, *tags).execute()
    except Exception as exc:  # noqa: BLE001 - as kombu's ack_log_error: logged, never raised in the loop
        log.error(
            "could not acknowledge %d messages (%r): they come back after the visibility timeout",
            len(tags),
            exc,
        )


# Task events (received, succeeded) published together at most this often: Flower sees them a
# few milliseconds later, and the consumer makes one Redis round trip per window instead of one
# per event (about 0.4 ms of the consumer thread per job, measured with py-spy on bench overhead).
EVENT_FLUSH_S = 0.02


def batch_task_events(window_s: float = EVENT_FLUSH_S) -> None:
    """Let Celery's consumer flush its buffered task events once per ``window_s``, not per event.

    Celery already buffers task events and publishes a buffer as one ``task.multi`` message, but
    it schedules a flush for every event, so with a job every few milliseconds each flush carries
    one. Here the first event of a window schedules the flush (on the consumer's own loop, which
    is the only thread that touches its timer) and the others join it. Only the worker calls this.
    """
    from celery.worker.consumer.consumer import Consumer
    from vine import promise

    original = Consumer.on_send_event_buffered
    if getattr(original, "batches_events", False):
        return

    def on_send_event_buffered(self: Any) -> None:
        hub = self.hub
        if hub is None:
            return original(self)
        scheduler = self.__dict__.get("_joycap_schedule")
        if scheduler is None:
            scheduler = self.__dict__["_joycap_schedule"] = promise(lambda: _schedule_flush(self, window_s))
        hub.call_soon(scheduler)  # thread-safe: pool threads send task-succeeded events too
        return None

    on_send_event_buffered.batches_events = True  # type: ignore[attr-defined]
    Consumer.on_send_event_buffered = on_send_event_buffered


def _schedule_flush(consumer: Any, window_s: float) -> None:
    # On the consumer's loop thread: one flush per window.
    if consumer.__dict__.get("_joycap_flush_due"):
        return
    consumer.__dict__["_joycap_flush_due"] = True

    def flush() -> None:
        consumer.__dict__["_joycap_flush_due"] = False
        consumer._flush_events()

    consumer.hub.call_later(window_s, flush)
