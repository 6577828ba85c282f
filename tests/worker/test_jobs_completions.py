"""The completion writer: captions that finish together share a transaction, failures stay apart.

The database's write lock is held from another connection while the writer's first transaction
waits on it, so the captions handed in meanwhile pile up and must all go in the next one.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DataError
from sqlmodel import Session

from joycap_queue.store import engines, jobstate
from joycap_queue.store.models import Job
from tests.support.jobs import insert
from tests.support.services import wait_until
from worker.completions import CompletionWriter


@contextmanager
def write_lock_held(url: str) -> Iterator[None]:
    """Another connection holds the database's write lock on the job table until the block ends."""
    if url.startswith("sqlite"):
        conn = sqlite3.connect(str(make_url(url).database), isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()
        return
    other = create_engine(engines.normalize_url(url))
    with other.connect() as conn:
        conn.execute(text("LOCK TABLE job IN EXCLUSIVE MODE"))
        try:
            yield
        finally:
            conn.rollback()
    other.dispose()


def count(engine: Engine, name: str) -> Callable[[], int]:
    seen = [0]

    def listener(*_: object) -> None:
        seen[0] += 1

    event.listen(engine, name, listener)
    return lambda: seen[0]


def claimed(url: str, *keys: str) -> dict[str, int]:
    ids = insert(url, *keys)
    for job_id in ids.values():
        jobstate.claim_job(engines.get_engine(url), job_id, worker="w", max_attempts=3)
    return ids


def completion(job_id: int, caption: str) -> jobstate.Completion:
    return jobstate.Completion(job_id, caption, 10, 5)


def stored_while_locked(
    url: str, plug: jobstate.Completion, items: list[jobstate.Completion]
) -> tuple[CompletionWriter, Future[bool], list[Future[bool]], Callable[[], int]]:
    """The plug's transaction waits on the lock while ``items`` are handed in; then all go."""
    engine = engines.get_engine(url)
    writer = CompletionWriter(engine, retry_s=30)
    begins, commits = count(engine, "begin"), count(engine, "commit")
    pool = ThreadPoolExecutor(len(items) + 1)
    with write_lock_held(url):
        first = pool.submit(writer.complete, plug)
        wait_until(lambda: begins() == 1, timeout=10, what="the plug's transaction to begin")
        rest = [pool.submit(writer.complete, item) for item in items]
        wait_until(lambda: writer.backlog == len(items), timeout=10, what="the captions to pile up")
        assert not first.done()
    pool.shutdown(wait=True)
    return writer, first, rest, commits


def test_captions_finishing_together_share_one_transaction(database_url: str) -> None:
    ids = claimed(database_url, "plug", "a", "b", "c", "d", "e")
    items = [completion(ids[key], f"caption {key}") for key in "abcde"]
    _writer, first, rest, commits = stored_while_locked(database_url, completion(ids["plug"], "plug"), items)
    assert first.result() and [future.result() for future in rest] == [True] * 5
    assert commits() == 2  # the plug alone, then the five together
    with Session(engines.get_engine(database_url)) as session:
        rows = [session.get(Job, job_id) for job_id in ids.values()]
        assert [(r.status, r.caption) for r in rows if r is not None] == [
            ("done", key if key == "plug" else f"caption {key}") for key in ids
        ]


def test_a_caption_finished_elsewhere_is_not_stored_and_the_others_are(database_url: str) -> None:
    ids = claimed(database_url, "a", "b")
    engine = engines.get_engine(database_url)
    assert jobstate.complete_job(engine, ids["a"], caption="elsewhere", prompt_tokens=1, output_tokens=1)
    writer = CompletionWriter(engine, retry_s=30)
    assert not writer.complete(completion(ids["a"], "late"))
    assert writer.complete(completion(ids["b"], "mine"))
    with Session(engine) as session:
        assert [session.get(Job, ids[k]).caption for k in "ab"] == ["elsewhere", "mine"]  # type: ignore[union-attr]


@pytest.mark.postgres
def test_a_caption_the_database_refuses_fails_only_its_own_job(postgres_url: str) -> None:
    ids = claimed(postgres_url, "plug", "a", "bad", "c")
    # PostgreSQL refuses NUL in text: a value that fails for good, not a database away.
    items = [
        completion(ids["a"], "caption a"),
        completion(ids["bad"], "nul \x00 here"),
        completion(ids["c"], "c"),
    ]
    writer, first, rest, _commits = stored_while_locked(postgres_url, completion(ids["plug"], "plug"), items)
    assert first.result()
    assert rest[0].result() and rest[2].result()
    with pytest.raises(DataError):
        rest[1].result()
    with Session(engines.get_engine(postgres_url)) as session:
        statuses = {k: session.get(Job, job_id).status for k, job_id in ids.items()}  # type: ignore[union-attr]
    assert statuses == {"plug": "done", "a": "done", "bad": "running", "c": "done"}
    # The writer goes on serving: the job that failed can still have a caption stored.
    assert writer.complete(completion(ids["bad"], "clean"))
