"""What the tests write to and read from the jobs tables."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlmodel import Session, select

from joycap_queue.store import engines, jobstate
from joycap_queue.store.models import DatasetRow, Job


def jobs_in(database_url: str) -> list[Job]:
    with Session(engines.get_engine(database_url)) as session:
        return list(session.exec(select(Job).order_by(Job.id)))


def all_finished(database_url: str, expected: int) -> Callable[[], bool]:
    def check() -> bool:
        jobs = jobs_in(database_url)
        return len(jobs) == expected and all(job.status in ("done", "failed") for job in jobs)

    return check


def rows_in(database_url: str) -> list[DatasetRow]:
    with Session(engines.get_engine(database_url)) as session:
        return list(session.exec(select(DatasetRow).order_by(DatasetRow.row_index)))


def row(key: str, **extra: Any) -> dict[str, Any]:
    return {
        "path": f"/images/{key}.jpg",
        "content_hash": key.ljust(64, "0"),
        "profile": "beta-one",
        "prompt": "Write a long detailed description for this image.",
        "model": "m",
        "dedup_key": key,
        **extra,
    }


def insert(url: str, *keys: str) -> dict[str, int]:
    with Session(engines.get_engine(url)) as session:
        inserted = jobstate.insert_jobs(session, [row(k) for k in keys])
        session.commit()
    return inserted
