"""A PostgreSQL for the tests: the one on 127.0.0.1:5432 when it answers, else one of their own.

A new user's laptop has no PostgreSQL running, and the PostgreSQL tests must not skip there, so
they start a throwaway server as they start their own redis-server: the machine's ``initdb`` and
``postgres`` (Debian's /usr/lib/postgresql/N/bin included), else the binaries the ``pgserver``
wheel brings. PostgreSQL refuses to run as root, so under root the server runs as the
``postgres`` user (or ``nobody``) through ``runuser``.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _bin_dir() -> Path | None:
    found = shutil.which("initdb")
    if found and shutil.which("postgres"):
        return Path(found).resolve().parent
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True):
        return Path(candidate).parent
    try:
        import pgserver  # type: ignore[import-not-found]
    except ImportError:
        return None
    bundled = Path(pgserver.__file__).parent / "pginstall" / "bin"
    return bundled if (bundled / "initdb").exists() else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class OwnPostgres:
    url: str
    process: subprocess.Popen[bytes]
    data_dir: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM: PostgreSQL's "smart" shutdown
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def start_postgres() -> OwnPostgres:
    """initdb a throwaway cluster (trust auth, fsync off), start it on a free port, create `test`."""
    bin_dir = _bin_dir()
    if bin_dir is None:
        raise RuntimeError(
            "no PostgreSQL answers on 127.0.0.1:5432 and none is installed: install PostgreSQL "
            "(apt install postgresql) or `pip install pgserver`, or set JOYCAP_TEST_POSTGRES_URL"
        )
    root = Path(tempfile.mkdtemp(prefix="joycap-pg-"))
    data, sockets = root / "data", root / "sockets"
    sockets.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:
        user = "postgres"
        try:
            pwd.getpwnam(user)
        except KeyError:
            user = "nobody"
        os.chmod(root, 0o755)
        shutil.chown(root, user)
        shutil.chown(sockets, user)
        prefix = ["runuser", "-u", user, "--"]
    subprocess.run(
        [*prefix, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
        check=True,
        capture_output=True,
    )
    port = _free_port()
    process = subprocess.Popen(
        [
            *prefix,
            str(bin_dir / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-k",
            str(sockets),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-c",
            "max_connections=200",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    server = OwnPostgres(f"postgresql+psycopg://postgres@127.0.0.1:{port}/test", process, root)
    admin_url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    deadline = time.monotonic() + 30
    while True:
        try:
            engine = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("CREATE DATABASE test"))
            engine.dispose()
            return server
        except sqlalchemy.exc.OperationalError:
            if process.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise RuntimeError("the tests' own PostgreSQL did not start") from None
            time.sleep(0.2)
