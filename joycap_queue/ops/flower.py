"""Flower on the queue: its settings as FLOWER_* variables, started under a Supervisor, and its
URL kept in the database (a lease) while it runs, so `status` can show where it is."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.engine import Engine

from joycap_queue.config import Settings, settings_environment
from joycap_queue.errors import JoycapError, OptionError
from joycap_queue.messaging.app import make_celery, ping_broker
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


def stop_on_sigterm() -> None:
    def raise_interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, raise_interrupt)
    # A process started in the background by a shell inherits SIGINT ignored, and Python then
    # installs no Ctrl-C handler: Ctrl-C (or the SIGINT a supervisor sends) must still stop us.
    signal.signal(signal.SIGINT, signal.default_int_handler)


def serve_flower(
    settings: Settings,
    *,
    port: int,
    address: str,
    no_auth: bool,
    on_started: Callable[[str], None],
    on_stopping: Callable[[], None],
) -> None:
    """Run Flower until Ctrl-C or SIGTERM (JoycapError if it exits by itself); ``on_started``
    gets its URL once it answers."""
    flower_environment(settings, address=address, no_auth=no_auth)  # refuse bad auth before starting
    ping_broker(make_celery(settings))
    engine = engines.get_engine(settings.effective_database_url)
    supervisor = Supervisor()
    stop_on_sigterm()
    beat = None
    try:
        url = start_flower(supervisor, settings, port=port, address=address, no_auth=no_auth, log_path=None)
        beat = announce_flower(engine, url)
        on_started(url)
        while not supervisor.exited():
            time.sleep(0.5)
        raise JoycapError("Flower exited")
    except KeyboardInterrupt:
        on_stopping()
    finally:
        if beat is not None:
            beat.stop()
        supervisor.stop(grace_s=10)
