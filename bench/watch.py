"""Watch folders: time from a file's close to its job being queued, and a burst of 5,000 files.

A real redis-server, a SQLite file and the real `FolderWatcher` (inotify, then polling) on a
temporary inbox; no worker is needed, since "queued" means the job row is committed and its
message sent. Latency is read from each job's `queued_at` against the wall-clock time the
writer closed the file.

    python -m bench watch
"""

from __future__ import annotations

import io
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

from PIL import Image
from sqlmodel import Session, func, select

from bench.common import print_table, record
from joycap_queue.captions.request import RequestOptions
from joycap_queue.config import Settings
from joycap_queue.intake.watch.config import inbox_config
from joycap_queue.intake.watch.watcher import FolderWatcher
from joycap_queue.ops.services import start_redis
from joycap_queue.store import engines
from joycap_queue.store.models import Job

LATENCY_FILES = 100
LATENCY_GAP_S = 0.05
BURST_FILES = 5000
SETTLE_S = 2.0
POLL_S = 1.0


def png(seed: int) -> bytes:
    image = Image.new("RGB", (32, 32), (seed % 256, seed // 256 % 256, seed // 65536 % 256))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def queued_times(settings: Settings) -> dict[str, float]:
    with Session(engines.get_engine(settings.effective_database_url)) as session:
        return {job.path: job.queued_at.timestamp() for job in session.exec(select(Job))}


def count_jobs(settings: Settings) -> int:
    with Session(engines.get_engine(settings.effective_database_url)) as session:
        return int(session.exec(select(func.count()).select_from(Job)).one())


def run_mode(work: Path, broker_url: str, *, polling: bool) -> dict[str, float]:
    mode = "polling" if polling else "inotify"
    settings = Settings(
        broker_url=broker_url,
        database_url=f"sqlite:///{work / f'{mode}.db'}",
        queue=f"bench-watch-{uuid.uuid4().hex[:8]}",
        model="bench-model",
    )
    figures: dict[str, float] = {}
    for phase in ("latency", "burst"):
        inbox = work / f"{mode}-{phase}"
        inbox.mkdir()
        config = inbox_config(
            inbox, settings, RequestOptions(caption_type="Descriptive", length="long", sidecar=("none",))
        )
        watcher = FolderWatcher(
            [config], settings, settle_seconds=SETTLE_S, polling=polling, polling_interval=POLL_S
        )
        thread = threading.Thread(target=watcher.run, daemon=True)
        thread.start()
        while watcher.observer is None:
            time.sleep(0.01)
        before = count_jobs(settings)
        try:
            if phase == "latency":
                closed: dict[str, float] = {}
                for i in range(LATENCY_FILES):
                    path = inbox / f"photo-{i:04d}.png"
                    path.write_bytes(png(i))
                    closed[str(path)] = time.time()
                    time.sleep(LATENCY_GAP_S)
                wait_for(settings, before + LATENCY_FILES)
                queued = queued_times(settings)
                latencies = sorted(queued[path] - at for path, at in closed.items())
                figures[f"{mode}_p50"] = statistics.median(latencies)
                figures[f"{mode}_p95"] = latencies[int(len(latencies) * 0.95) - 1]
            else:
                payloads = [png(100_000 + i) for i in range(BURST_FILES)]
                start = time.time()
                for i, data in enumerate(payloads):
                    (inbox / f"burst-{i:05d}.png").write_bytes(data)
                wait_for(settings, before + BURST_FILES)
                last = max(t for path, t in queued_times(settings).items() if f"{mode}-burst" in path)
                figures[f"{mode}_burst"] = last - start
        finally:
            watcher.stop()
            thread.join(timeout=30)
    return figures


def wait_for(settings: Settings, count: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while count_jobs(settings) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {count_jobs(settings)} of {count} jobs queued after {timeout} s")
        time.sleep(0.05)


def main() -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="joycap-bench-watch-") as tmp:
        work = Path(tmp)
        server = start_redis(work / "redis")
        try:
            figures = {
                **run_mode(work, server.url, polling=False),
                **run_mode(work, server.url, polling=True),
            }
        finally:
            server.stop()
    rows = [
        ("inotify", figures["inotify_p50"], figures["inotify_p95"], figures["inotify_burst"]),
        ("polling", figures["polling_p50"], figures["polling_p95"], figures["polling_burst"]),
    ]
    print_table(
        f"watch folders: close → queued ({LATENCY_FILES} files, {LATENCY_GAP_S * 1000:.0f} ms apart), "
        f"and a burst of {BURST_FILES} files (settle {SETTLE_S:g} s, poll every {POLL_S:g} s)",
        ("observer", "latency p50 s", "latency p95 s", f"burst {BURST_FILES} s"),
        rows,
    )
    results = {
        "watch_latency_p50_s": round(figures["inotify_p50"], 4),
        "watch_latency_p95_s": round(figures["inotify_p95"], 4),
        "watch_burst_5000_s": round(figures["inotify_burst"], 2),
        "watch_polling_latency_p50_s": round(figures["polling_p50"], 4),
        "watch_polling_latency_p95_s": round(figures["polling_p95"], 4),
        "watch_polling_burst_5000_s": round(figures["polling_burst"], 2),
    }
    record(results)
    return results


if __name__ == "__main__":
    main()
