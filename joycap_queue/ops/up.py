"""`up`: the whole service on one machine, started and stopped together.

Redis if none is reachable, one worker per GPU (or one CPU worker), Flower, and a watcher on the
inbox in this process; Ctrl-C or SIGTERM stops everything it started, and a child that dies stops
the rest with its log's tail.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.engine import make_url

from joycap_queue.captions.request import RequestOptions
from joycap_queue.config import Settings, mask_url, settings_environment
from joycap_queue.errors import JoycapError
from joycap_queue.intake.watch.config import inbox_config
from joycap_queue.intake.watch.watcher import FolderWatcher
from joycap_queue.ops.flower import EndpointHeartbeat, announce_flower, start_flower, stop_on_sigterm
from joycap_queue.ops.gpus import visible_gpus
from joycap_queue.ops.services import RedisServer, redis_reachable, start_redis
from joycap_queue.ops.supervise import Supervisor
from joycap_queue.store import engines


def run_up(
    inbox: Path,
    settings: Settings,
    options: RequestOptions,
    *,
    flower: bool,
    polling: bool,
    port: int,
    address: str,
    no_auth: bool,
    say: Callable[[str], None],
    say_err: Callable[[str], None],
) -> None:
    """Start everything, watch ``inbox`` until interrupted, stop everything; ``say`` gets what
    started where (stdout), ``say_err`` the stopping."""
    if flower and not (settings.flower_user and settings.flower_password):
        no_auth, address = True, "127.0.0.1"
    logs = settings.data_dir / "logs"
    supervisor = Supervisor()
    redis: RedisServer | None = None
    beat: EndpointHeartbeat | None = None
    stop_on_sigterm()
    try:
        if not redis_reachable(settings.broker_url):
            redis = start_redis(settings.data_dir / "redis", persist=True)
            settings = settings.model_copy(update={"broker_url": redis.url})
            say(
                f"redis:    started redis-server on port {redis.port} (data in {settings.data_dir / 'redis'})"
            )
        else:
            say(f"redis:    {mask_url(settings.broker_url)}")
        engine = engines.get_engine(settings.effective_database_url)
        say(f"database: {_shown_database(settings)}")
        env = {**os.environ, **settings_environment(settings, "worker")}
        gpus = len(visible_gpus())
        worker_argv = [sys.executable, "-m", "joycap_queue", "worker"] + (["--gpus", "all"] if gpus else [])
        supervisor.start("worker", worker_argv, env=env, log_path=logs / "worker.log")
        say(f"workers:  {f'one per GPU ({gpus})' if gpus else 'one CPU worker'}; log {logs / 'worker.log'}")
        if flower:
            url = start_flower(
                supervisor,
                settings,
                port=port,
                address=address,
                no_auth=no_auth,
                log_path=logs / "flower.log",
            )
            beat = announce_flower(engine, url)
            say(f"flower:   {url} ({'localhost only, no auth' if no_auth else 'basic auth'})")
        watcher = FolderWatcher([inbox_config(inbox, settings, options)], settings, polling=polling)
        say(f"watching: {inbox.resolve()} — drop images there; Ctrl-C stops everything")
        watcher.run(on_tick=children_alive(supervisor))
    except KeyboardInterrupt:
        say_err("\nstopping …")
    finally:
        if beat is not None:
            beat.stop()
        supervisor.stop()
        if redis is not None:
            redis.stop()
    say_err("stopped")


def _shown_database(settings: Settings) -> str:
    database = make_url(engines.normalize_url(settings.effective_database_url))
    if database.get_backend_name() == "sqlite":
        return str(database.database)
    return mask_url(str(settings.effective_database_url))


def children_alive(supervisor: Supervisor) -> Callable[[], None]:
    """A watcher tick that stops `up` when one of its children died, with the child's log tail."""

    def check() -> None:
        dead = supervisor.exited()
        if dead:
            child = dead[0]
            raise JoycapError(
                f"the {child.name} exited (code {child.process.returncode}):\n{child.log_tail()}"
            )

    return check
