"""Creating the tables, and the columns added since the first release, on any database."""

from __future__ import annotations

import logging
import time

from sqlalchemy import inspect
from sqlalchemy import text as sql_text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import (
    IntegrityError,
    OperationalError,
    ProgrammingError,
)
from sqlmodel import SQLModel

from joycap_queue.store.search import ensure_search_index

log = logging.getLogger(__name__)


def create_schema(engine: Engine, *, attempts: int = 5) -> None:
    # Processes starting together on a new database (the demo's worker and submit, two workers)
    # race to create the tables: the loser sees "already exists". Its next look finds them.
    for attempt in range(attempts):
        try:
            SQLModel.metadata.create_all(engine)
            add_missing_columns(engine)
            ensure_search_index(engine)
            return
        except (OperationalError, ProgrammingError, IntegrityError) as exc:
            text = str(exc.orig or exc).lower()
            racing = "already exists" in text or "duplicate key" in text
            if not racing or attempt == attempts - 1:
                raise
            time.sleep(0.1 * (attempt + 1))


# Columns added after the first release, with the DDL that adds them to an older database.
ADDED_COLUMNS = {
    ("job", "isolation"): "ALTER TABLE job ADD COLUMN isolation INTEGER NOT NULL DEFAULT 0",
    ("job", "claim_id"): "ALTER TABLE job ADD COLUMN claim_id VARCHAR(64)",
    ("job", "quantize"): "ALTER TABLE job ADD COLUMN quantize TEXT NOT NULL DEFAULT 'none'",
    ("job", "adapter"): "ALTER TABLE job ADD COLUMN adapter TEXT NOT NULL DEFAULT ''",
    ("job", "adapter_hash"): "ALTER TABLE job ADD COLUMN adapter_hash TEXT NOT NULL DEFAULT ''",
    ("watcher", "owner"): "ALTER TABLE watcher ADD COLUMN owner VARCHAR(64)",
    ("endpoint", "owner"): "ALTER TABLE endpoint ADD COLUMN owner VARCHAR(64)",
    ("endpoint", "state"): "ALTER TABLE endpoint ADD COLUMN state TEXT",
    ("job", "cleanup"): "ALTER TABLE job ADD COLUMN cleanup TEXT NOT NULL DEFAULT '{}'",
    ("job", "raw_caption"): "ALTER TABLE job ADD COLUMN raw_caption TEXT",
    ("job", "quality"): "ALTER TABLE job ADD COLUMN quality TEXT",
    ("job", "caption_attempts"): "ALTER TABLE job ADD COLUMN caption_attempts INTEGER NOT NULL DEFAULT 0",
    ("job", "quality_flags"): "ALTER TABLE job ADD COLUMN quality_flags TEXT NOT NULL DEFAULT '[]'",
}


def add_missing_columns(engine: Engine) -> None:
    inspector = inspect(engine)
    for (table, column), ddl in ADDED_COLUMNS.items():
        if column not in {c["name"] for c in inspector.get_columns(table)}:
            with engine.begin() as conn:
                conn.execute(sql_text(ddl))
