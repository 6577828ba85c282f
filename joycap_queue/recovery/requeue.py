"""`requeue`: rebuild lost messages from the database, the source of truth.

When Redis loses its data (a restart without persistence, a flush, a failover), or a submit or
retry is interrupted between its commit and its send, jobs the database holds as `queued` (or
as `running` for longer than a job can run) have no message. Requeueing sends one for each such
job whose message is not still in Redis, waiting in the queue or delivered and unacknowledged,
so no job is ever sent twice while its first message is alive. Jobs of a worker that died are
handed out again first. The work itself is `recovery.recover`; this is the `requeue` command's
and the worker start's way in.
"""

from __future__ import annotations

from datetime import timedelta

from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import RedisError

from joycap_queue.config import Settings, mask_url
from joycap_queue.errors import ServiceUnavailable
from joycap_queue.messaging.app import make_celery
from joycap_queue.recovery.sweep import IN_FLIGHT, RecoverySummary, jobs_to_requeue, live_job_ids, recover

__all__ = ["IN_FLIGHT", "RequeueSummary", "job_ids_in_broker", "jobs_to_requeue", "requeue_lost"]
RequeueSummary = RecoverySummary


def job_ids_in_broker(settings: Settings) -> set[int]:
    """Job ids with a live message: waiting in the queue (any priority) or delivered, not acked."""
    app = make_celery(settings)
    try:
        with app.connection_for_read() as connection:
            return live_job_ids(connection.default_channel, settings.queue)
    except (KombuOperationalError, RedisError, OSError) as exc:
        raise ServiceUnavailable(f"cannot reach Redis at {mask_url(settings.broker_url)}: {exc}") from None


def requeue_lost(
    settings: Settings, *, stale_after: timedelta | None = None, in_flight: timedelta = IN_FLIGHT
) -> RequeueSummary:
    """Rescue dead workers' jobs, then send a message for every job whose message Redis lost.

    Waits for another process's recovery to end rather than skip it: the caller (a worker
    starting, someone typing `requeue`) wants the answer for now.
    """
    return recover(settings, running_after=stale_after, in_flight=in_flight, wait=60.0)
