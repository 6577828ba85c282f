"""The tests' own PostgreSQL, for machines where none answers on 127.0.0.1:5432 (a new laptop)."""

from __future__ import annotations

from sqlmodel import Session

from joycap_queue.store import engines, queries
from tests.support.postgres_server import answers, start_postgres


def test_the_tests_can_start_a_postgresql_of_their_own() -> None:
    server = start_postgres()
    try:
        assert server.url != "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        engine = engines.get_engine(server.url)  # creates the schema, as a worker's start does
        with Session(engine) as session:
            assert queries.status_counts(session)["queued"] == 0
        engines.dispose_engines()
    finally:
        server.stop()
    port = int(server.url.rsplit(":", 1)[1].split("/")[0])
    assert not answers("127.0.0.1", port)
