"""A COMMIT that lands while its acknowledgement is lost: the retried write knows it as its own.

A proxy in front of the real PostgreSQL lets one COMMIT through to the server, drops the
server's answer and cuts the connection, so the commit is done and the client is told the
connection broke. The write is then retried (engines.retrying, as the worker does) and must find
its own claim, or its own caption, rather than a job someone else finished.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlmodel import Session

from joycap_queue.ops.services import free_port
from joycap_queue.store import engines, jobstate
from joycap_queue.store.models import Job
from tests.support.jobs import insert
from tests.support.services import postgres_address, through
from worker.completions import CompletionWriter

pytestmark = pytest.mark.postgres
# psycopg sends COMMIT as a simple query: 'Q', its length, the text and a NUL.
COMMIT = b"COMMIT\x00"


class AckLosingProxy:
    """Forwards to PostgreSQL; once armed, the next COMMIT's answer never reaches the client."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.armed = threading.Event()
        self.lost = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            committing = threading.Event()
            threading.Thread(target=self._to_server, args=(client, upstream, committing), daemon=True).start()
            threading.Thread(target=self._to_client, args=(upstream, client, committing), daemon=True).start()

    def _to_server(self, client: socket.socket, upstream: socket.socket, committing: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                if self.armed.is_set() and COMMIT in data:
                    self.armed.clear()
                    committing.set()
                upstream.sendall(data)

    def _to_client(self, upstream: socket.socket, client: socket.socket, committing: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := upstream.recv(65536):
                if committing.is_set():
                    # The server has answered the COMMIT, so it is done; the client never hears it.
                    self.lost.set()
                    break
                client.sendall(data)
        for s in (client, upstream):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def through_proxy(postgres_url: str) -> Iterator[tuple[str, AckLosingProxy]]:
    proxy = AckLosingProxy(postgres_address(postgres_url))
    yield through(postgres_url, proxy.port), proxy
    engines.dispose_engines()
    proxy.close()


def job_row(url: str, job_id: int) -> Job:
    with Session(engines.get_engine(url)) as session:
        row = session.get(Job, job_id)
        assert row is not None
        return row


def test_a_claim_whose_commit_ack_is_lost_is_taken_once(
    postgres_url: str, through_proxy: tuple[str, AckLosingProxy]
) -> None:
    url, proxy = through_proxy
    job_id = insert(postgres_url, "a")["a"]
    engine = engines.get_engine(url)
    proxy.armed.set()
    claim = engines.retrying(30, what="claim")(
        jobstate.claim_job, engine, job_id, worker="w1", max_attempts=3, claim_id="claim-1"
    )
    assert proxy.lost.is_set(), "the proxy never saw the COMMIT"
    assert claim.job is not None, claim.reason
    row = job_row(postgres_url, job_id)
    assert (row.status, row.attempts, row.worker, row.claim_id) == ("running", 1, "w1", "claim-1")


def test_captions_whose_commit_ack_is_lost_count_as_stored(
    postgres_url: str, through_proxy: tuple[str, AckLosingProxy]
) -> None:
    url, proxy = through_proxy
    ids = insert(postgres_url, "a", "b", "c")
    engine = engines.get_engine(url)
    for key, job_id in ids.items():
        jobstate.claim_job(engine, job_id, worker="w1", max_attempts=3, claim_id=f"claim-{key}")
    writer = CompletionWriter(engine, retry_s=30)
    proxy.armed.set()
    # Whether the three share the transaction whose answer is lost or not, each is stored once
    # and each task is told so: none discards its caption as "finished elsewhere".
    with ThreadPoolExecutor(3) as pool:
        stored = list(
            pool.map(
                lambda key: writer.complete(
                    jobstate.Completion(ids[key], f"caption {key}", 1, 2, f"claim-{key}")
                ),
                ids,
            )
        )
    assert proxy.lost.is_set(), "the proxy never saw the COMMIT"
    assert stored == [True, True, True]
    assert [job_row(postgres_url, job_id).caption for job_id in ids.values()] == [
        "caption a",
        "caption b",
        "caption c",
    ]
