"""The idempotent writes, on SQLite and on PostgreSQL."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import update
from sqlmodel import Session, col

from joycap_queue.errors import OptionError, ServiceUnavailable
from joycap_queue.store import engines, jobstate, queries
from joycap_queue.store.models import Job
from tests.support.jobs import insert


def test_insert_skips_known_dedup_keys(database_url: str) -> None:
    first = insert(database_url, "a", "b")
    assert set(first) == {"a", "b"}
    second = insert(database_url, "b", "c")
    assert set(second) == {"c"}
    with Session(engines.get_engine(database_url)) as session:
        assert jobstate.existing_jobs(session, ["a", "c", "zzz"]) == {
            "a": (first["a"], "queued", "/images/a.jpg"),
            "c": (second["c"], "queued", "/images/c.jpg"),
        }
        assert queries.status_counts(session)["queued"] == 3


def test_claim_complete_is_idempotent(database_url: str) -> None:
    engine = engines.get_engine(database_url)
    job_id = insert(database_url, "a")["a"]
    claim = jobstate.claim_job(engine, job_id, worker="w1", max_attempts=3)
    assert claim.job is not None and claim.job.attempts == 1 and claim.job.status == "running"
    assert jobstate.complete_job(engine, job_id, caption="first", prompt_tokens=800, output_tokens=5)
    # A redelivered message finds the job done: no second claim, no second caption.
    assert jobstate.claim_job(engine, job_id, worker="w2", max_attempts=3).job is None
    assert not jobstate.complete_job(engine, job_id, caption="second", prompt_tokens=1, output_tokens=1)
    assert not jobstate.fail_job(engine, job_id, "late failure")
    with Session(engine) as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert (job.status, job.caption, job.error, job.worker) == ("done", "first", None, "w1")


def test_attempts_are_counted_and_capped(database_url: str) -> None:
    engine = engines.get_engine(database_url)
    job_id = insert(database_url, "a")["a"]
    for attempt in (1, 2):
        claim = jobstate.claim_job(engine, job_id, worker="w", max_attempts=2)
        assert claim.job is not None and claim.job.attempts == attempt
        # A second message for a running job is refused; the worker dies, and the job it was
        # blamed for goes back to the queue with the attempt kept (as liveness does).
        assert jobstate.claim_job(engine, job_id, worker="x", max_attempts=2).job is None
        assert jobstate.return_to_queue(
            engine, job_id, status="running", worker="w", started_at=claim.job.started_at
        )
    claim = jobstate.claim_job(engine, job_id, worker="w", max_attempts=2)
    assert claim.job is None and "gave up after 2 attempts" in claim.reason
    with Session(engine) as session:
        job = session.get(Job, job_id)
        assert job is not None and job.status == "failed" and job.attempts == 3


def test_a_claim_retried_after_its_commit_landed_is_its_own(database_url: str) -> None:
    # The retry after a lost COMMIT acknowledgement calls the claim again with the same
    # arguments: it finds the job running under its own name and takes it, counted once.
    engine = engines.get_engine(database_url)
    job_id = insert(database_url, "a")["a"]
    first = jobstate.claim_job(engine, job_id, worker="w1", max_attempts=3, claim_id="claim-1")
    again = jobstate.claim_job(engine, job_id, worker="w1", max_attempts=3, claim_id="claim-1")
    assert first.job is not None and again.job is not None
    assert (again.job.status, again.job.attempts, again.job.worker) == ("running", 1, "w1")
    # Without a name of its own, a claim is named by this process: the same worker here again.
    job_b = insert(database_url, "b")["b"]
    assert jobstate.claim_job(engine, job_b, worker="w1", max_attempts=3).job is not None
    retried = jobstate.claim_job(engine, job_b, worker="w1", max_attempts=3)
    assert retried.job is not None and retried.job.attempts == 1
    # Anyone else's claim is refused: a second message (another claim), another worker.
    assert jobstate.claim_job(engine, job_id, worker="w1", max_attempts=3, claim_id="claim-2").job is None
    assert jobstate.claim_job(engine, job_id, worker="w2", max_attempts=3, claim_id="claim-1").job is None
    with Session(engine) as session:
        row = session.get(Job, job_id)
        assert row is not None and (row.status, row.attempts, row.claim_id) == ("running", 1, "claim-1")


def test_a_completion_retried_after_its_commit_landed_counts_as_stored(database_url: str) -> None:
    engine = engines.get_engine(database_url)
    job_id = insert(database_url, "a")["a"]
    jobstate.claim_job(engine, job_id, worker="w1", max_attempts=3, claim_id="claim-1")
    caption = {"caption": "first", "prompt_tokens": 1, "output_tokens": 1}
    assert jobstate.complete_job(engine, job_id, **caption, claim_id="claim-1")
    # Its retry is told the caption is stored (it is), so the worker writes its sidecars...
    assert jobstate.complete_job(engine, job_id, **caption, claim_id="claim-1")
    # ...while a caption made under another claim is still discarded.
    assert not jobstate.complete_job(engine, job_id, caption="second", prompt_tokens=1, output_tokens=1)
    assert not jobstate.complete_job(engine, job_id, **caption, claim_id="claim-2")


def test_a_job_marked_to_run_alone_is_claimed_only_alone(database_url: str) -> None:
    engine = engines.get_engine(database_url)
    job_id = insert(database_url, "a")["a"]
    with Session(engine) as session:
        session.execute(update(Job).where(col(Job.id) == job_id).values(isolation=1))
        session.commit()
    shared = jobstate.claim_job(engine, job_id, worker="w1", max_attempts=3, claim_id="c")
    assert shared.job is None and shared.run_alone
    alone = jobstate.claim_job(engine, job_id, worker="w1", max_attempts=3, alone=True, claim_id="c")
    assert alone.job is not None and alone.job.attempts == 1
    with Session(engine) as session:
        row = session.get(Job, job_id)
        assert row is not None and (row.status, row.isolation) == ("running", 2)


def test_a_gave_up_claim_retried_still_gives_up(database_url: str) -> None:
    engine = engines.get_engine(database_url)
    job_id = insert(database_url, "a")["a"]
    with Session(engine) as session:
        session.execute(update(Job).where(col(Job.id) == job_id).values(attempts=2))
        session.commit()
    first = jobstate.claim_job(engine, job_id, worker="w1", max_attempts=2, claim_id="c")
    again = jobstate.claim_job(engine, job_id, worker="w1", max_attempts=2, claim_id="c")
    assert first.gave_up and again.gave_up and "gave up after 2 attempts" in again.reason


def test_captions_stored_together_each_conditional(database_url: str) -> None:
    engine = engines.get_engine(database_url)
    ids = insert(database_url, "a", "b", "c")
    for job_id in ids.values():
        jobstate.claim_job(engine, job_id, worker="w", max_attempts=3)
    assert jobstate.fail_job(engine, ids["b"], "broken")
    stored = jobstate.complete_jobs(
        engine, [jobstate.Completion(ids[k], f"caption {k}", 1, 2) for k in ("a", "b", "c")]
    )
    assert stored == [True, False, True]
    with Session(engine) as session:
        rows = {k: session.get(Job, job_id) for k, job_id in ids.items()}
        assert {k: (r.status, r.caption) for k, r in rows.items() if r is not None} == {
            "a": ("done", "caption a"),
            "b": ("failed", None),
            "c": ("done", "caption c"),
        }


def test_concurrent_completions_store_one_caption(database_url: str) -> None:
    engine = engines.get_engine(database_url)
    job_id = insert(database_url, "a")["a"]
    jobstate.claim_job(engine, job_id, worker="w", max_attempts=3)
    stored: list[bool] = []

    def complete(text: str) -> None:
        stored.append(jobstate.complete_job(engine, job_id, caption=text, prompt_tokens=1, output_tokens=1))

    threads = [threading.Thread(target=complete, args=(f"caption {i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert stored.count(True) == 1


def test_reset_puts_jobs_back(database_url: str) -> None:
    engine = engines.get_engine(database_url)
    job_id = insert(database_url, "a")["a"]
    jobstate.claim_job(engine, job_id, worker="w", max_attempts=3)
    jobstate.complete_job(engine, job_id, caption="x", prompt_tokens=1, output_tokens=1)
    with Session(engine) as session:
        jobstate.reset_jobs(session, [job_id], submission_id=None)
        session.commit()
        job = session.get(Job, job_id)
        assert job is not None
        assert (job.status, job.caption, job.attempts, job.finished_at) == ("queued", None, 0, None)


def test_list_jobs_filters(database_url: str) -> None:
    insert(database_url, "cat1", "dog1", "cat2")
    engine = engines.get_engine(database_url)
    with Session(engine) as session:
        assert [j.path for j in queries.list_jobs(session, path_pattern="*/cat*")] == [
            "/images/cat1.jpg",
            "/images/cat2.jpg",
        ]
        assert len(queries.list_jobs(session, states=["done"])) == 0
        assert len(queries.list_jobs(session, limit=2)) == 2


def test_bad_database_urls_are_one_line_errors(tmp_path: Any) -> None:
    with pytest.raises(OptionError, match="malformed database URL"):
        engines.get_engine("not a url")
    with pytest.raises(ServiceUnavailable) as info:
        engines.get_engine("postgresql://joy:hunter2@127.0.0.1:1/nothing")
    assert "hunter2" not in str(info.value) and "cannot reach the database" in str(info.value)


def test_processes_racing_to_create_the_schema_all_get_it(tmp_path: Any) -> None:
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'race.db'}"
    code = "import sys; from joycap_queue.store import engines; engines.get_engine(sys.argv[1]); print('ok')"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(6)
    ]
    outputs = [process.communicate(timeout=60) for process in processes]
    assert [out.strip() for out, _err in outputs] == ["ok"] * 6, [err for _out, err in outputs]
