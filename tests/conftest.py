"""Real services for the tests: a redis-server per session, PostgreSQL schemas, worker processes.

Nothing here is a mock: Redis is a `redis-server` child process on a free port, the database is a
SQLite file or a schema of its own in the PostgreSQL on 127.0.0.1:5432 (or, where none answers
there, in a PostgreSQL the session starts itself: tests/support/postgres_server.py), and a worker is
`joycap-queue worker` in a subprocess running the tiny model through transformers.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import create_engine, make_url, text

from joycap_queue.config import Settings
from joycap_queue.messaging.app import queues_key
from joycap_queue.ops.services import RedisServer, start_redis
from joycap_queue.store import engines
from tests.support import postgres_server
from tests.support.postgres_server import answers, start_postgres

# Read when huggingface_hub is first imported, so set before any test module imports transformers.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# JOYCAP_TEST_OWN_POSTGRES=1 starts the tests' own server even where 5432 answers (to test that path).
OWN_POSTGRES = os.environ.get("JOYCAP_TEST_OWN_POSTGRES") == "1"
# Small generations keep the end-to-end tests quick; the code path is the same as for 256 tokens.
TEST_MAX_NEW_TOKENS = "12"


def wait_until(
    predicate: Callable[[], bool], *, timeout: float, interval: float = 0.1, what: str = ""
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worker.model.tiny import build_tiny_model

    return Path(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'joycap.db'}"


@pytest.fixture(scope="session")
def postgres_base_url() -> Iterator[str]:
    """The `test` database of the PostgreSQL on 127.0.0.1:5432, or of one started for the session."""
    given = os.environ.get("JOYCAP_TEST_POSTGRES_URL")
    if given:
        yield given
        return
    if answers("127.0.0.1", 5432) and not OWN_POSTGRES:
        yield postgres_server.DEFAULT_URL
        return
    server = start_postgres()
    yield server.url
    engines.dispose_engines()
    server.stop()


def postgres_address(url: str) -> tuple[str, int]:
    """(host, port) of a PostgreSQL URL: where a test's proxy forwards to."""
    parsed = make_url(url)
    return parsed.host or "127.0.0.1", parsed.port or 5432


def through(url: str, port: int) -> str:
    """``url`` with its server's port replaced by ``port`` (a proxy in front of it)."""
    host, real = postgres_address(url)
    return url.replace(f"{host}:{real}", f"127.0.0.1:{port}", 1)


@pytest.fixture
def postgres_url(postgres_base_url: str) -> Iterator[str]:
    """A schema of its own in the `test` database, dropped afterwards."""
    schema = f"joycap_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_base_url)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    yield f"{postgres_base_url}?options=-csearch_path%3D{schema}"
    engines.dispose_engines()
    with admin.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str:
    name = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return str(request.getfixturevalue(name))


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
        if check and result.returncode != 0:
            raise AssertionError(f"joycap-queue {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def settings(self) -> Settings:
        """The settings a CLI call or a worker of this service runs with."""
        env = self.env
        return Settings(
            broker_url=env["JOYCAP_BROKER_URL"],
            database_url=env["JOYCAP_DATABASE_URL"],
            queue=env["JOYCAP_QUEUE"],
            model=env["JOYCAP_MODEL"],
            max_new_tokens=int(env["JOYCAP_MAX_NEW_TOKENS"]),
            data_dir=Path(env["JOYCAP_DATA_DIR"]),
        )

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


@pytest.fixture
def service_for(
    redis_server: RedisServer, tiny_model: Path, tmp_path: Path
) -> Iterator[Callable[[str], Service]]:
    """Builds a Service on a database URL; workers it started are stopped afterwards."""
    services: list[Service] = []
    workers: list[Worker] = []

    def make(database_url: str) -> Service:
        env = dict(os.environ)
        env.update(
            JOYCAP_BROKER_URL=redis_server.url,
            JOYCAP_DATABASE_URL=database_url,
            JOYCAP_QUEUE=f"test-{uuid.uuid4().hex[:10]}",
            JOYCAP_MODEL=str(tiny_model),
            JOYCAP_MAX_NEW_TOKENS=TEST_MAX_NEW_TOKENS,
            JOYCAP_DATA_DIR=str(tmp_path / "data"),
            OMP_NUM_THREADS="1",
            # The tiny model's random captions mostly run to the token limit: re-trying each
            # would triple every test's captioning and change its greedy captions. The quality
            # guard's own tests turn re-tries on.
            JOYCAP_QUALITY_RETRIES="0",
        )
        service = Service(env, tmp_path)
        original = service.start_worker

        def start_worker(*args: str, name: str = "w1") -> Worker:
            worker = original(*args, name=name)
            workers.append(worker)
            return worker

        service.start_worker = start_worker  # type: ignore[method-assign]
        services.append(service)
        return service

    yield make
    for worker in workers:
        worker.stop()


FORMATS = [
    ("jpg", "JPEG"),
    ("png", "PNG"),
    ("webp", "WEBP"),
    ("bmp", "BMP"),
    ("gif", "GIF"),
    ("tiff", "TIFF"),
]


def make_images(root: Path, count: int, *, seed: int = 0) -> list[Path]:
    """`count` distinct images of mixed formats, sizes and modes, some in nested folders."""
    rng = random.Random(seed)
    paths = []
    for i in range(count):
        ext, fmt = FORMATS[i % len(FORMATS)]
        folder = root / ("nested/deeper" if i % 5 == 0 else "nested" if i % 3 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        size = (rng.randint(16, 700), rng.randint(16, 500))
        image = Image.new("RGB", size, (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
        image.putpixel((0, 0), (i % 256, (i * 7) % 256, (i * 13) % 256))
        if fmt == "PNG" and i % 2 == 0:
            image = image.convert("RGBA")
        path = folder / f"image {i:03d}.{ext}"
        image.save(path, fmt)
        paths.append(path)
    return paths


@pytest.fixture
def image_factory() -> Callable[..., list[Path]]:
    return make_images


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
