"""The database or Redis lost mid-command: `submit` and `export` stop with one line and a rerun
resumes; `status --watch` and `watch` wait, say so once, and go on.

Real services only: a redis-server of the test's own, stopped and started again on its port; a
SQLite file held by the test's own write transaction ("database is locked"); a TCP proxy in front
of the real PostgreSQL, cut and resumed.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import termios
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import update
from sqlmodel import Session, col, select

from joycap_queue.cli import cli
from joycap_queue.config import Settings
from joycap_queue.ops.services import start_redis
from joycap_queue.recovery.requeue import job_ids_in_broker
from joycap_queue.store import engines, jobstate
from joycap_queue.store.models import Job
from tests.support.jobs import jobs_in
from tests.support.netproxy import CuttableProxy
from tests.support.services import Service, postgres_address, through, wait_until
from tests.support.watching import png_bytes


def one_error_line(stderr: str) -> str:
    """The one `Error:` line of a command that failed, and no traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


def start_cli(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "joycap_queue", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


class HeldImage:
    """A FIFO named like an image, given to `submit` after a folder of images.

    `submit` reaches it after it has pinged Redis, created its submission and read the folder's
    images, and blocks reading it: the moment to take a service away. `release` then swaps an
    empty file in under its name (the header probe opens the path again and finds no image) and
    lets the read end.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path)
        self.writer: int | None = None

    def wait_for_reader(self, process: subprocess.Popen[str]) -> None:
        def opened() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"submit ended before reading {self.path}: {process.communicate()}")
            try:
                # Without a reader, a non-blocking open for writing fails with ENXIO.
                self.writer = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                return False
            return True

        wait_until(opened, timeout=60, what="submit to read the held image")

    def release(self) -> None:
        empty = self.path.with_name(".empty")
        empty.write_bytes(b"")
        os.replace(empty, self.path)
        assert self.writer is not None
        os.close(self.writer)


class OwnRedis:
    """A redis-server the test may stop; `restart` brings one back on the same port, empty."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.server = start_redis(workdir)

    @property
    def url(self) -> str:
        return self.server.url

    def stop(self) -> None:
        self.server.stop()

    def restart(self) -> None:
        self.server = start_redis(self.workdir, port=self.server.port)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    redis = OwnRedis(tmp_path / "redis")
    yield redis
    redis.stop()


def settings_of(env: dict[str, str]) -> Settings:
    return Settings(
        broker_url=env["JOYCAP_BROKER_URL"],
        database_url=env["JOYCAP_DATABASE_URL"],
        queue=env["JOYCAP_QUEUE"],
    )


def test_submit_that_loses_redis_part_way_stops_with_one_line_and_a_rerun_resumes(
    sqlite_url: str,
    service_for: Callable[[str], Service],
    image_factory: Callable[..., list[Path]],
    own_redis: OwnRedis,
    tmp_path: Path,
) -> None:
    image_factory(tmp_path / "in", 5)
    service = service_for(sqlite_url)
    service.env["JOYCAP_BROKER_URL"] = own_redis.url
    held = HeldImage(tmp_path / "held.png")
    submit = start_cli(service.env, "submit", str(tmp_path / "in"), str(held.path))
    held.wait_for_reader(submit)
    own_redis.stop()  # between the rows and their messages
    held.release()
    _out, stderr = submit.communicate(timeout=120)
    assert submit.returncode == 1
    line = one_error_line(stderr)
    assert "Redis" in line, line
    assert line.endswith(
        "the jobs saved so far are kept: run the same submit again once Redis is back to queue the rest"
    )
    saved = [job for job in jobs_in(sqlite_url) if job.status == "queued"]
    assert len(saved) == 5  # committed before the send that failed: nothing was lost

    own_redis.restart()
    again = service.cli("submit", str(tmp_path / "in"))
    assert "queued 0, already done 0, already queued 5" in again.stdout, again.stdout


def test_submit_on_a_locked_sqlite_database_stops_with_one_line_and_a_rerun_resumes(
    sqlite_url: str,
    service_for: Callable[[str], Service],
    image_factory: Callable[..., list[Path]],
    tmp_path: Path,
) -> None:
    image_factory(tmp_path / "in", 3)
    service = service_for(sqlite_url)
    held = HeldImage(tmp_path / "held.png")
    submit = start_cli(service.env, "submit", str(tmp_path / "in"), str(held.path))
    held.wait_for_reader(submit)
    # Another process's long write transaction: submit's insert waits out SQLite's busy
    # timeout (30 s, db.py) and gets "database is locked".
    holder = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        held.release()
        _out, stderr = submit.communicate(timeout=120)
    finally:
        holder.rollback()
        holder.close()
    assert submit.returncode == 1
    line = one_error_line(stderr)
    assert "the database is unavailable (database is locked)" in line, line
    assert line.endswith("run the same submit again once the database is back to queue the rest"), line
    assert not jobs_in(sqlite_url)  # the batch was rolled back whole

    again = service.cli("submit", str(tmp_path / "in"))
    assert "queued 3," in again.stdout, again.stdout


class Proxy(CuttableProxy):
    def cut(self) -> None:
        # Closing a listening socket does not wake the thread blocked in its accept(), which
        # keeps it listening: new connections would hang in the backlog instead of being
        # refused, and `resume` could not bind the port again. Shutting it down wakes it.
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
        super().cut()


@pytest.fixture
def postgres_proxy(postgres_url: str) -> Iterator[tuple[CuttableProxy, str]]:
    """A cuttable proxy to the test's PostgreSQL schema, and the URL through it."""
    proxy = Proxy(postgres_address(postgres_url)).start()
    yield proxy, through(postgres_url, proxy.port)
    proxy.cut()


def done_jobs(url: str, count: int, *, status: str = "done") -> None:
    rows = [
        {
            "path": f"/images/{i:05d}.png",
            "content_hash": f"{i:064x}",
            "profile": "beta-one",
            "prompt": "Write a long detailed description for this image.",
            "model": "m",
            "dedup_key": f"key-{i}",
            "status": status,
            "caption": f"A caption long enough to fill a pipe quickly, number {i}. " * 2,
        }
        for i in range(count)
    ]
    with Session(engines.get_engine(url)) as session:
        jobstate.insert_jobs(session, rows)
        session.commit()


# A pipe holds 64 KiB; the writer's next 8 KiB block waits once it is this full.
PIPE_FULL = 65536 - 8192


def unread(process: subprocess.Popen[str]) -> int:
    """Bytes waiting in a child's stdout pipe, not read yet."""
    assert process.stdout is not None
    count = array.array("i", [0])
    fcntl.ioctl(process.stdout.fileno(), termios.FIONREAD, count)
    return count[0]


@pytest.mark.postgres
def test_export_that_loses_postgres_mid_stream_stops_with_one_line_and_a_rerun_resumes(
    postgres_url: str,
    postgres_proxy: tuple[CuttableProxy, str],
    service_for: Callable[[str], Service],
) -> None:
    proxy, through_proxy = postgres_proxy
    done_jobs(postgres_url, 3000)
    service = service_for(through_proxy)
    export = start_cli(service.env, "export", "--format", "csv")
    assert export.stdout is not None
    # Rows stream from a server-side cursor, 1,000 (about 150 KB here) a fetch: once the pipe is
    # full the export is blocked writing the first fetch's rows, and its next fetch meets the cut.
    wait_until(lambda: unread(export) >= PIPE_FULL, timeout=30, what="the export to fill its pipe")
    proxy.cut()
    out, stderr = export.communicate(timeout=120)
    assert export.returncode == 1
    line = one_error_line(stderr)
    assert line.startswith("Error: the database is unavailable ("), line
    assert line.endswith("the output above is incomplete; run the same export again once it is back"), line
    assert out.startswith("im_name,") and len(out.splitlines()) < 3001

    proxy.resume()
    again = service.cli("export", "--format", "csv")
    assert len(again.stdout.splitlines()) == 3001


@pytest.mark.postgres
def test_status_watch_waits_for_postgres_and_goes_on(
    postgres_url: str,
    postgres_proxy: tuple[CuttableProxy, str],
    service_for: Callable[[str], Service],
    tmp_path: Path,
) -> None:
    proxy, through_proxy = postgres_proxy
    done_jobs(postgres_url, 1, status="queued")
    service = service_for(through_proxy)
    out, err = tmp_path / "status.out", tmp_path / "status.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        status = subprocess.Popen(
            [sys.executable, "-m", "joycap_queue", "status", "--watch", "--until-done", "--interval", "0.2"],
            env=service.env,
            stdout=stdout,
            stderr=stderr,
            text=True,
        )
    try:
        wait_until(lambda: "queued 1" in out.read_text(), timeout=30, what="a first report")
        proxy.cut()
        wait_until(lambda: "waiting" in err.read_text(), timeout=30, what="status to wait")
        # Meanwhile the job finishes; once the database is back, status sees it and ends.
        with Session(engines.get_engine(postgres_url)) as session:
            session.execute(update(Job).values(status="done"))
            session.commit()
        proxy.resume()
        code = status.wait(timeout=60)
    finally:
        if status.poll() is None:
            status.kill()
    said = [line for line in err.read_text().splitlines() if not line.startswith("note: ")]  # tiny model
    assert code == 0, said
    [waiting, back] = said
    assert waiting.startswith("the database is unavailable (") and waiting.endswith(
        "; waiting for it to come back"
    ), waiting
    assert back == "the database answers again; going on"
    assert "done 1" in out.read_text().split("\n\n")[-1]


def queued_and_sent(database_url: str, settings: Settings, name: str) -> Callable[[], bool]:
    def check() -> bool:
        with Session(engines.get_engine(database_url)) as session:
            found = session.exec(select(Job.id).where(col(Job.path).endswith(name))).all()
        return len(found) == 1 and found[0] in job_ids_in_broker(settings)

    return check


WAIT_S = 90  # two test processes share two cores; a met condition returns at once


@pytest.mark.postgres
def test_watch_waits_for_redis_and_postgres_and_goes_on(
    postgres_url: str,
    postgres_proxy: tuple[CuttableProxy, str],
    service_for: Callable[[str], Service],
    own_redis: OwnRedis,
    tmp_path: Path,
) -> None:
    proxy, through_proxy = postgres_proxy
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    service = service_for(through_proxy)
    service.env["JOYCAP_BROKER_URL"] = own_redis.url
    settings = settings_of(service.env)
    log_path = tmp_path / "watch.log"
    with log_path.open("w") as log:
        watch = subprocess.Popen(
            [sys.executable, "-m", "joycap_queue", "watch", str(inbox), "--settle-seconds", "0.5"],
            env=service.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:

        def logged(text: str, times: int = 1) -> Callable[[], bool]:
            def check() -> bool:
                if watch.poll() is not None:
                    raise AssertionError(f"watch exited with {watch.returncode}:\n{log_path.read_text()}")
                return log_path.read_text().count(text) >= times

            return check

        wait_until(logged("watching"), timeout=WAIT_S, what="the watcher")
        own_redis.stop()
        (inbox / "during-redis.png").write_bytes(png_bytes(900))
        wait_until(
            logged("waiting for it to come back"), timeout=WAIT_S, what="the watcher to wait for Redis"
        )
        own_redis.restart()
        wait_until(
            queued_and_sent(postgres_url, settings, "during-redis.png"), timeout=WAIT_S, what="the held file"
        )

        proxy.cut()
        (inbox / "during-postgres.png").write_bytes(png_bytes(901))
        wait_until(
            logged("waiting for it to come back", 2),
            timeout=WAIT_S,
            what="the watcher to wait for PostgreSQL",
        )
        proxy.resume()
        wait_until(
            queued_and_sent(postgres_url, settings, "during-postgres.png"),
            timeout=WAIT_S,
            what="the second file",
        )
        wait_until(logged("answer again; going on", 2), timeout=WAIT_S, what="the watcher to say it goes on")
    finally:
        watch.send_signal(signal.SIGTERM)
        code = watch.wait(timeout=30)
    text = log_path.read_text()
    assert code == 0, text
    assert "Traceback" not in text, text
    assert "watcher stopped" in text
    assert len(jobs_in(postgres_url)) == 2


@pytest.mark.postgres
def test_any_command_meeting_an_outage_says_so_in_one_line(postgres_proxy: tuple[CuttableProxy, str]) -> None:
    proxy, through_proxy = postgres_proxy
    engines.get_engine(through_proxy)  # the engine and its pool exist: the database goes away after
    proxy.cut()
    result = CliRunner().invoke(cli, ["results", "--database-url", through_proxy])
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    line = one_error_line(result.stderr)
    assert line.startswith("Error: the database is unavailable ("), line
    assert line.endswith("; run the command again once it is back"), line
