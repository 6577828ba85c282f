"""The real services the tests drive: a Service (the environment CLI calls and workers share), its
worker processes, waiting on a condition, and what the tests ask of the broker's queues.

The fixtures that build these (redis-server, the tiny model, databases, ``service_for``) are in
tests/conftest.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from sqlalchemy import make_url

from joycap_queue.config import Settings
from joycap_queue.messaging.app import queues_key

# Small generations keep the end-to-end tests quick; the code path is the same as for 256 tokens.
TEST_MAX_NEW_TOKENS = "12"
# Commands that load the model or serve: never in the test process (Service.call).
HEAVY_COMMANDS = frozenset({"caption", "worker", "model", "up", "demo", "watch", "flower"})


def wait_until(
    predicate: Callable[[], bool], *, timeout: float, interval: float = 0.1, what: str = ""
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")


def postgres_address(url: str) -> tuple[str, int]:
    """(host, port) of a PostgreSQL URL: where a test's proxy forwards to."""
    parsed = make_url(url)
    return parsed.host or "127.0.0.1", parsed.port or 5432


def through(url: str, port: int) -> str:
    """``url`` with its server's port replaced by ``port`` (a proxy in front of it)."""
    host, real = postgres_address(url)
    return url.replace(f"{host}:{real}", f"127.0.0.1:{port}", 1)


def _checked(
    result: subprocess.CompletedProcess[str], args: tuple[str, ...], check: bool
) -> subprocess.CompletedProcess[str]:
    if check and result.returncode != 0:
        raise AssertionError(f"joycap-queue {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@dataclass
class Service:
    """The environment a set of CLI calls and workers share: broker, database, queue, model."""

    env: dict[str, str]
    tmp: Path

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "joycap_queue", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return _checked(result, args, check)

    def call(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """The same command as ``cli``, run in this process through click's CliRunner.

        It skips the second of interpreter and import start-up a subprocess costs (most of the
        suite's CLI calls are data in, data out). Each call reads the environment afresh and
        leaves no pooled connection or Celery app behind, as a process of its own would. Calls
        whose stderr a test reads for a one-line error stay on ``cli``: only a real process
        shows exactly what a user's terminal gets (Python warnings, the log's last-resort
        handler).
        """
        # The heavy side holds one model per process (worker/runtime.py): a second command here
        # would reuse the first one's. Those run in processes of their own, as users run them.
        assert args and args[0] not in HEAVY_COMMANDS, f"run `{args[0]}` with Service.cli"
        from celery import _state as celery_state
        from click.testing import CliRunner

        from joycap_queue.cli import cli
        from joycap_queue.config import get_settings
        from joycap_queue.store import engines

        env: dict[str, str | None] = {key: None for key in os.environ if key not in self.env}
        env.update(self.env)
        apps_before = set(celery_state._apps)
        get_settings.cache_clear()
        try:
            result = CliRunner().invoke(cli, list(args), env=env, prog_name="joycap-queue")
        finally:
            get_settings.cache_clear()
            engines.dispose_engines()
            for app in set(celery_state._apps) - apps_before:
                app.close()
        stderr = result.stderr
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            # A subprocess would print the traceback: keep it where the tests look for one.
            stderr += "".join(traceback.format_exception(result.exception))
        completed = subprocess.CompletedProcess(
            ["joycap-queue", *args], result.exit_code, result.stdout, stderr
        )
        return _checked(completed, args, check)

    def settings(self) -> Settings:
        """The settings a CLI call or a worker of this service runs with: read from its environment
        as theirs are (every JOYCAP_ variable, a test's own included), not from this process's."""
        with mock.patch.dict(os.environ, self.env, clear=True):
            return Settings()

    def start_worker(self, *args: str, name: str = "w1") -> Worker:
        log_path = self.tmp / f"worker-{name}.log"
        log = log_path.open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "joycap_queue", "worker", "--hostname", f"{name}@%h", *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        worker = Worker(process, log_path)
        wait_until(worker.ready, timeout=120, interval=0.2, what=f"worker {name} to be ready")
        return worker


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"worker exited with {self.process.returncode}:\n{self.log()}")
        return " ready." in self.log()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def caption_queues(settings: Settings) -> list[str]:
    """The Redis lists holding this service's waiting caption messages: the shared queue and
    every model queue under it (jobs are routed by model)."""
    import redis

    client = redis.Redis.from_url(settings.broker_url)
    try:
        members = sorted(m.decode() for m in client.smembers(queues_key(settings.queue)))
    finally:
        client.close()
    return [settings.queue, *members]


def drop_messages(settings: Settings) -> None:
    """What Redis losing its queues does: every waiting caption message gone."""
    import redis

    client = redis.Redis.from_url(settings.broker_url)
    try:
        client.delete(*caption_queues(settings))
    finally:
        client.close()


def message_count(settings: Settings) -> int:
    """Waiting caption messages in every queue of this service."""
    import redis

    client = redis.Redis.from_url(settings.broker_url)
    try:
        return sum(int(client.llen(queue)) for queue in caption_queues(settings))
    finally:
        client.close()
