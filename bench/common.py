"""What every benchmark shares: results.json, the table printer, and the real services.

Every figure is measured here, on this machine, side by side in one run; ``record`` keeps the
other benchmarks' keys, so ``python -m bench overhead`` updates its figures only.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy import func
from sqlmodel import Session, col, select

from joycap_queue.config import Settings
from joycap_queue.ops.services import RedisServer, start_redis
from joycap_queue.store import engines
from joycap_queue.store.models import Job

RESULTS = Path(__file__).resolve().parent / "results.json"
ROOT = Path(__file__).resolve().parent.parent


def record(figures: dict[str, Any], path: Path = RESULTS) -> None:
    """Merge ``figures`` into results.json, keeping every other key (read, update, rename)."""
    try:
        current = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        current = {}
    if not isinstance(current, dict):
        current = {}
    current.update(figures)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain-text table on stdout, numbers right-aligned."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [
        max(len(str(c)), *(len(r[i]) for r in cells)) if cells else len(str(c)) for i, c in enumerate(columns)
    ]
    print(f"\n{title}")
    print("  ".join(str(c).ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(row, widths, strict=True)))


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def _numeric(text: str) -> bool:
    return text.replace(",", "").replace(".", "").replace("-", "").replace("x", "").isdigit()


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "os": platform.platform(),
    }


def make_images(root: Path, count: int, *, size: tuple[int, int] = (32, 32), fmt: str = "PNG") -> list[Path]:
    """``count`` distinct small images, 1,000 to a folder."""
    ext = {"PNG": "png", "JPEG": "jpg", "BMP": "bmp"}[fmt]
    paths = []
    for i in range(count):
        folder = root / f"d{i // 1000:03d}"
        if i % 1000 == 0:
            folder.mkdir(parents=True, exist_ok=True)
        image = Image.new("RGB", size, (i % 251, (i // 251) % 251, (i * 7) % 251))
        image.putpixel((0, 0), (i % 256, (i >> 8) % 256, (i >> 16) % 256))
        path = folder / f"{i:06d}.{ext}"
        image.save(path, fmt)
        paths.append(path)
    return paths


@dataclass
class Stack:
    """A real redis-server, a SQLite database and `joycap-queue worker` processes, in a temp dir."""

    workdir: Path
    redis: RedisServer
    model: str
    queue: str = field(default_factory=lambda: f"bench-{uuid.uuid4().hex[:8]}")
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def database_url(self) -> str:
        return f"sqlite:///{self.workdir / 'bench.db'}"

    def settings(self, **overrides: Any) -> Settings:
        return Settings(
            broker_url=self.redis.url,
            database_url=self.database_url,
            queue=self.queue,
            model=self.model,
            data_dir=self.workdir,
            **overrides,
        )

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            JOYCAP_BROKER_URL=self.redis.url,
            JOYCAP_DATABASE_URL=self.database_url,
            JOYCAP_QUEUE=self.queue,
            JOYCAP_MODEL=self.model,
            JOYCAP_DATA_DIR=str(self.workdir),
            HF_HUB_OFFLINE="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
        )
        env.update(extra)
        return env

    def start_worker(self, *args: str, env: dict[str, str] | None = None, name: str = "bench") -> Path:
        """Start a worker and wait until Celery says it is ready; returns its log file."""
        log_path = self.workdir / f"worker-{name}-{len(self.workers)}.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "joycap_queue", "worker", "--hostname", f"{name}@%h", *args],
            env=env or self.env(),
            stdout=log_path.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.workers.append(process)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(
                    f"worker exited with {process.returncode}:\n{log_path.read_text()[-3000:]}"
                )
            if " ready." in log_path.read_text(errors="replace"):
                return log_path
            time.sleep(0.1)
        raise RuntimeError(f"worker not ready after 300 s:\n{log_path.read_text()[-3000:]}")

    def stop_workers(self) -> None:
        for process in self.workers:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.workers:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.workers.clear()

    def finished(self) -> int:
        with Session(engines.get_engine(self.database_url)) as session:
            query = select(func.count()).select_from(Job).where(col(Job.status).in_(["done", "failed"]))
            return int(session.exec(query).one())

    def wait_finished(self, count: int, *, timeout: float, interval: float = 0.05) -> float:
        """Wait until ``count`` jobs are done or failed; returns the monotonic time it happened."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.finished() >= count:
                return time.monotonic()
            time.sleep(interval)
        raise RuntimeError(f"only {self.finished()} of {count} jobs finished within {timeout} s")

    def failed(self) -> list[tuple[str, str | None]]:
        with Session(engines.get_engine(self.database_url)) as session:
            return [(j.path, j.error) for j in session.exec(select(Job).where(col(Job.status) == "failed"))]

    def fresh_queue(self) -> None:
        """A new queue and an empty database, for the next measurement in the same stack."""
        self.stop_workers()
        engines.dispose_engines()
        for stale in self.workdir.glob("bench.db*"):
            stale.unlink()
        self.queue = f"bench-{uuid.uuid4().hex[:8]}"


@contextmanager
def stack(model: str) -> Iterator[Stack]:
    with tempfile.TemporaryDirectory(prefix="joycap-bench-") as tmp:
        workdir = Path(tmp)
        redis = start_redis(workdir / "redis")
        running = Stack(workdir, redis, model)
        try:
            yield running
        finally:
            running.stop_workers()
            engines.dispose_engines()
            redis.stop()
