"""`flower` and `up`: monitoring, and the whole service on one machine with one command."""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from sqlalchemy.engine import Engine, make_url

from joycap_queue.cli.options import (
    ExtraGreedyCommand,
    build_settings,
    caption_options,
    connection_options,
    generation_options,
    model_options,
    output_options,
    tiny_model_notice,
    variant_options,
)
from joycap_queue.config import Settings, mask_url, settings_environment
from joycap_queue.errors import JoycapError, OptionError
from joycap_queue.intake.watch.config import inbox_config
from joycap_queue.intake.watch.watcher import FolderWatcher
from joycap_queue.messaging.app import make_celery, ping_broker
from joycap_queue.ops.services import RedisServer, redis_reachable, start_redis
from joycap_queue.ops.supervise import Supervisor
from joycap_queue.store import engines, leases

FLOWER_HEARTBEAT_S = 5.0


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def flower_environment(settings: Settings, *, address: str, no_auth: bool) -> dict[str, str]:
    """Flower's settings as its FLOWER_* variables: the password never reaches argv or a log."""
    env = {**os.environ, **settings_environment(settings, "flower")}
    password = settings.flower_password.get_secret_value() if settings.flower_password else ""
    if no_auth:
        if not _is_loopback(address):
            raise OptionError("no_auth", f"--no-auth serves Flower only on localhost, not on {address}")
        env["FLOWER_UNAUTHENTICATED_API"] = "true"
        env.pop("FLOWER_BASIC_AUTH", None)
    elif not (settings.flower_user and password):
        raise JoycapError(
            "Flower needs basic auth: set JOYCAP_FLOWER_USER and JOYCAP_FLOWER_PASSWORD, "
            "or pass --no-auth to serve it on localhost only"
        )
    else:
        env["FLOWER_BASIC_AUTH"] = f"{settings.flower_user}:{password}"
        env.pop("FLOWER_UNAUTHENTICATED_API", None)
    return env


def flower_url(address: str, port: int) -> str:
    host = socket.gethostname() if address in ("", "0.0.0.0", "::") else address
    return f"http://{host}:{port}"


def wait_for_http(url: str, *, child: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise JoycapError(f"Flower exited at start (code {child.returncode})")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise JoycapError(f"Flower did not answer at {url} within {timeout:g} s")


def start_flower(
    supervisor: Supervisor,
    settings: Settings,
    *,
    port: int,
    address: str,
    no_auth: bool,
    log_path: Path | None,
) -> str:
    env = flower_environment(settings, address=address, no_auth=no_auth)
    argv = [sys.executable, "-m", "celery", "-A", "joycap_queue.messaging.celery_app", "flower"]
    child = supervisor.start(
        "flower", [*argv, f"--port={port}", f"--address={address}"], env=env, log_path=log_path
    )
    url = flower_url(address, port)
    wait_for_http(
        f"http://{'127.0.0.1' if address in ('', '0.0.0.0') else address}:{port}/healthcheck",
        child=child.process,
    )
    return url


class EndpointHeartbeat:
    """Keeps Flower's URL in the database while it runs, so `status` can show it.

    A lease (leases.py): beaten by the database's clock from a thread that survives the database
    being away, and registered again if its row was removed meanwhile.
    """

    def __init__(self, engine: Engine, url: str) -> None:
        self.lease = leases.EndpointLease(
            engine, kind="flower", url=url, host=socket.gethostname(), pid=os.getpid()
        ).take()
        self.beat = leases.Beat(FLOWER_HEARTBEAT_S, self.lease.renew, name="flower-endpoint").start()

    def stop(self) -> None:
        self.beat.stop()
        self.lease.release()


def announce_flower(engine: Engine, url: str) -> EndpointHeartbeat:
    return EndpointHeartbeat(engine, url)


def _stop_on_sigterm() -> None:
    def raise_interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, raise_interrupt)
    # A process started in the background by a shell inherits SIGINT ignored, and Python then
    # installs no Ctrl-C handler: Ctrl-C (or the SIGINT a supervisor sends) must still stop us.
    signal.signal(signal.SIGINT, signal.default_int_handler)


def flower_options(func: Any) -> Any:
    func = click.option(
        "--no-auth", is_flag=True, help="Serve Flower without basic auth: allowed on localhost only."
    )(func)
    func = click.option(
        "--address",
        default="127.0.0.1",
        show_default=True,
        envvar="JOYCAP_FLOWER_ADDRESS",
        help="Listen here.",
    )(func)
    func = click.option(
        "--port", type=click.IntRange(1, 65535), default=5555, show_default=True, envvar="JOYCAP_FLOWER_PORT"
    )(func)
    return func


@click.command()
@flower_options
@connection_options
def flower(port: int, address: str, no_auth: bool, **params: Any) -> None:
    """Start Flower on the queue: live workers, every image's task, and Prometheus /metrics.

    Basic auth comes from JOYCAP_FLOWER_USER and JOYCAP_FLOWER_PASSWORD; without them Flower
    refuses to start unless --no-auth, which serves it on localhost only.

    \b
    Examples:
      JOYCAP_FLOWER_USER=me JOYCAP_FLOWER_PASSWORD=... joycap-queue flower --address 0.0.0.0
      joycap-queue flower --no-auth            # http://127.0.0.1:5555, this machine only
    """
    settings = build_settings(params)
    flower_environment(settings, address=address, no_auth=no_auth)  # refuse bad auth before starting
    ping_broker(make_celery(settings))
    engine = engines.get_engine(settings.effective_database_url)
    supervisor = Supervisor()
    _stop_on_sigterm()
    beat = None
    try:
        url = start_flower(supervisor, settings, port=port, address=address, no_auth=no_auth, log_path=None)
        beat = announce_flower(engine, url)
        click.echo(
            f"Flower at {url} ({'no auth, localhost only' if no_auth else 'basic auth'}); metrics at {url}/metrics"
        )
        while not supervisor.exited():
            time.sleep(0.5)
        raise JoycapError("Flower exited")
    except KeyboardInterrupt:
        click.echo("stopping Flower", err=True)
    finally:
        if beat is not None:
            beat.stop()
        supervisor.stop(grace_s=10)


def detect_gpus() -> int:
    """GPUs as nvidia-smi lists them; asked without torch, so this process never touches CUDA."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listing.splitlines() if line.startswith("GPU "))


@click.command(cls=ExtraGreedyCommand)
@click.argument("inbox", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--no-flower", is_flag=True, help="Do not start Flower.")
@click.option("--polling", is_flag=True, help="Poll the inbox (NFS, SMB, Docker Desktop mounts).")
@flower_options
@output_options(default_sidecar=("txt",))
@caption_options
@generation_options
@model_options
@variant_options
@connection_options
def up(
    inbox: Path, no_flower: bool, polling: bool, port: int, address: str, no_auth: bool, **params: Any
) -> None:
    """Run everything on this machine: Redis if none is reachable, workers, a watcher on INBOX, Flower.

    One worker per GPU (or one CPU worker), the inbox watched with the caption options given, and
    Flower (basic auth from JOYCAP_FLOWER_USER/PASSWORD, else localhost only). Ctrl-C stops
    everything it started.

    \b
    Examples:
      joycap-queue up ~/inbox
      JOYCAP_MODEL=fancyfeast/llama-joycaption-beta-one-hf-llava joycap-queue up ~/inbox -t Straightforward
    """
    settings = build_settings(params)
    tiny_model_notice(settings.model)
    if not no_flower and not (settings.flower_user and settings.flower_password):
        no_auth, address = True, "127.0.0.1"
    logs = settings.data_dir / "logs"
    supervisor = Supervisor()
    redis: RedisServer | None = None
    beat: EndpointHeartbeat | None = None
    _stop_on_sigterm()
    try:
        if not redis_reachable(settings.broker_url):
            redis = start_redis(settings.data_dir / "redis", persist=True)
            settings = settings.model_copy(update={"broker_url": redis.url})
            click.echo(
                f"redis:    started redis-server on port {redis.port} (data in {settings.data_dir / 'redis'})"
            )
        else:
            click.echo(f"redis:    {mask_url(settings.broker_url)}")
        engine = engines.get_engine(settings.effective_database_url)
        database = make_url(engines.normalize_url(settings.effective_database_url))
        shown = (
            database.database
            if database.get_backend_name() == "sqlite"
            else mask_url(str(settings.effective_database_url))
        )
        click.echo(f"database: {shown}")
        env = {**os.environ, **settings_environment(settings, "worker")}
        gpus = detect_gpus()
        worker_argv = [sys.executable, "-m", "joycap_queue", "worker"] + (["--gpus", "all"] if gpus else [])
        supervisor.start("worker", worker_argv, env=env, log_path=logs / "worker.log")
        click.echo(
            f"workers:  {f'one per GPU ({gpus})' if gpus else 'one CPU worker'}; log {logs / 'worker.log'}"
        )
        if not no_flower:
            url = start_flower(
                supervisor,
                settings,
                port=port,
                address=address,
                no_auth=no_auth,
                log_path=logs / "flower.log",
            )
            beat = announce_flower(engine, url)
            click.echo(f"flower:   {url} ({'localhost only, no auth' if no_auth else 'basic auth'})")
        params["sidecar"] = params.get("sidecar") or ("txt",)
        watcher = FolderWatcher([inbox_config(inbox, settings, params)], settings, polling=polling)
        click.echo(f"watching: {inbox.resolve()} — drop images there; Ctrl-C stops everything")
        watcher.run(on_tick=_children_alive(supervisor))
    except KeyboardInterrupt:
        click.echo("\nstopping …", err=True)
    finally:
        if beat is not None:
            beat.stop()
        supervisor.stop()
        if redis is not None:
            redis.stop()
    click.echo("stopped", err=True)


def _children_alive(supervisor: Supervisor) -> Callable[[], None]:
    def check() -> None:
        dead = supervisor.exited()
        if dead:
            child = dead[0]
            raise JoycapError(
                f"the {child.name} exited (code {child.process.returncode}):\n{child.log_tail()}"
            )

    return check


COMMANDS = [flower, up]
