"""`make demo`: caption the bundled example images end to end on this machine, then clean up.

Runs the real pieces as a user would: a Redis server, `joycap-queue worker` in its own process,
`joycap-queue submit`, and `joycap-queue results`, all against a fresh SQLite file in `.demo/`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from sqlmodel import Session

from joycap_queue.config import mask_url
from joycap_queue.ops.services import RedisServer, redis_reachable, start_redis
from joycap_queue.store import engines, queries

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "images"
WAIT_S = 900


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "joycap_queue", *args]


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def main() -> int:
    workdir = Path(os.environ.get("JOYCAP_DEMO_DIR", ROOT / ".demo")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    database = workdir / "joycap.db"
    for stale in workdir.glob("joycap.db*"):
        stale.unlink()
    env = dict(os.environ)
    env.update(
        JOYCAP_DATABASE_URL=f"sqlite:///{database}",
        # A queue of its own, so nothing left in a shared Redis by another run reaches this worker.
        JOYCAP_QUEUE=f"joycap-demo-{uuid.uuid4().hex[:8]}",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
    )
    started = time.monotonic()
    server: RedisServer | None = None
    worker: subprocess.Popen[bytes] | None = None
    try:
        broker = env.get("JOYCAP_BROKER_URL", "redis://127.0.0.1:6379/0")
        if redis_reachable(broker):
            say(f"using the Redis at {mask_url(broker)}")
        else:
            server = start_redis(workdir / "redis")
            broker = server.url
            say(f"no Redis reachable: started redis-server on port {server.port}")
        env["JOYCAP_BROKER_URL"] = broker

        if not env.get("JOYCAP_MODEL"):
            tiny = workdir / "tiny-model"
            if not (tiny / "config.json").exists():
                say("building the tiny offline model (set JOYCAP_MODEL to use a real one)")
                subprocess.run(cli("model", "make-tiny", str(tiny)), env=env, check=True)
            env["JOYCAP_MODEL"] = str(tiny)

        log_path = workdir / "worker.log"
        say(f"starting a worker (log: {log_path})")
        with log_path.open("wb") as log:
            worker = subprocess.Popen(
                cli("worker", "--concurrency", "2"), env=env, stdout=log, stderr=subprocess.STDOUT
            )
        say(f"submitting {EXAMPLES.relative_to(ROOT)}")
        subprocess.run(cli("submit", str(EXAMPLES)), env=env, check=True)
        if not wait_for_jobs(database, worker, log_path):
            return 1
        say("captions from the database:")
        subprocess.run(cli("results", "--full"), env=env, check=True)
        subprocess.run(cli("status"), env=env, check=True)
        say(f"done in {time.monotonic() - started:.1f} s")
        return 0
    except subprocess.CalledProcessError as exc:
        say(f"a step failed (exit {exc.returncode}): {' '.join(exc.cmd[2:])}")
        return 1
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        if server is not None:
            server.stop()


def wait_for_jobs(database: Path, worker: subprocess.Popen[bytes], log_path: Path) -> bool:
    engine = engines.get_engine(f"sqlite:///{database}")
    deadline = time.monotonic() + WAIT_S
    last = ""
    while time.monotonic() < deadline:
        with Session(engine) as session:
            counts = queries.status_counts(session)
        line = ", ".join(f"{state} {count}" for state, count in counts.items())
        if line != last:
            say(line)
            last = line
        if counts["queued"] + counts["running"] == 0:
            return True
        if worker.poll() is not None:
            say(f"the worker exited with code {worker.returncode}; its log ends with:")
            print("\n".join(log_path.read_text(errors="replace").splitlines()[-20:]))
            return False
        time.sleep(0.5)
    say(f"jobs not finished after {WAIT_S} s; see {log_path}")
    return False


if __name__ == "__main__":
    raise SystemExit(main())
