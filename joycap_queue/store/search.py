"""Full-text search over captions: an FTS5 table on SQLite, a GIN index on PostgreSQL.

A search is a phrase: its words in this order, case-insensitive, the last word also matching as the
start of a longer word (``red ca`` finds "a red car"). Both databases split words the same way
for ordinary text; SQLite also ignores accents.
"""

from __future__ import annotations

import logging
import re

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.elements import ColumnElement, TextClause
from sqlmodel import Session, col

from joycap_queue.errors import OptionError, first_line
from joycap_queue.store.models import Job

log = logging.getLogger(__name__)

WhereClause = ColumnElement[bool] | TextClause

FTS_TABLE = "job_fts"
PG_INDEX = "ix_job_caption_fts"

# External-content FTS5: the index holds only tokens, the text stays in `job`. The triggers skip
# rows without a caption, so the 100,000 inserts of a big submit pay nothing for the index.
_SQLITE_DDL = (
    f"CREATE VIRTUAL TABLE IF NOT EXISTS {FTS_TABLE} USING fts5(caption, content='job', content_rowid='id')",
    f"""CREATE TRIGGER IF NOT EXISTS job_fts_insert AFTER INSERT ON job WHEN new.caption IS NOT NULL BEGIN
        INSERT INTO {FTS_TABLE}(rowid, caption) VALUES (new.id, new.caption); END""",
    f"""CREATE TRIGGER IF NOT EXISTS job_fts_delete AFTER DELETE ON job WHEN old.caption IS NOT NULL BEGIN
        INSERT INTO {FTS_TABLE}({FTS_TABLE}, rowid, caption) VALUES ('delete', old.id, old.caption); END""",
    f"""CREATE TRIGGER IF NOT EXISTS job_fts_update_old AFTER UPDATE OF caption ON job
        WHEN old.caption IS NOT NULL BEGIN
        INSERT INTO {FTS_TABLE}({FTS_TABLE}, rowid, caption) VALUES ('delete', old.id, old.caption); END""",
    f"""CREATE TRIGGER IF NOT EXISTS job_fts_update_new AFTER UPDATE OF caption ON job
        WHEN new.caption IS NOT NULL BEGIN
        INSERT INTO {FTS_TABLE}(rowid, caption) VALUES (new.id, new.caption); END""",
)
# The query must use the index's expression as it is, or PostgreSQL cannot use the index.
_PG_TSVECTOR = "to_tsvector('simple'::regconfig, coalesce({column}, ''::text))"


def ensure_search_index(engine: Engine) -> None:
    """Create the caption index if it is missing; run at every engine start, so older databases get it.

    A database that refuses (an SQLite built without FTS5, a PostgreSQL role that may not create
    indexes) still searches, without the index.
    """
    try:
        with engine.begin() as conn:
            if engine.dialect.name == "sqlite":
                _ensure_sqlite(conn)
            elif engine.dialect.name == "postgresql":
                expression = _PG_TSVECTOR.format(column="caption")
                conn.execute(text(f"CREATE INDEX IF NOT EXISTS {PG_INDEX} ON job USING gin ({expression})"))
    except DBAPIError as exc:
        # Two processes creating the index at once: one wins, the other sees a duplicate here.
        log.warning("caption search index not created: %s", first_line(exc, driver=True))


def _ensure_sqlite(conn: Connection) -> None:
    if _has_fts(conn):
        return
    for statement in _SQLITE_DDL:
        conn.execute(text(statement))
    # A database made before the index existed: index the captions it already holds.
    conn.execute(text(f"INSERT INTO {FTS_TABLE}({FTS_TABLE}) VALUES ('rebuild')"))


def _has_fts(conn: Connection) -> bool:
    found = conn.execute(
        text("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = :name"), {"name": FTS_TABLE}
    )
    return found.first() is not None


def search_words(query: str) -> list[str]:
    """The words of a search, as both databases split them; OptionError if there are none."""
    words = re.findall(r"[^\W_]+", query.casefold())
    if not words:
        raise OptionError("search", f"nothing to search for in {query!r}: give at least one word")
    return words


def caption_matches(session: Session, query: str) -> WhereClause:
    """A WHERE clause on `job` for captions containing the words of ``query`` as a phrase."""
    words = search_words(query)
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        tsquery = " <-> ".join(words) + ":*"
        clause = f"{_PG_TSVECTOR.format(column='job.caption')} @@ to_tsquery('simple', :caption_query)"
        return text(clause).bindparams(caption_query=tsquery)
    if dialect == "sqlite" and _has_fts(session.connection()):
        # Each word is letters and digits only, so quoting the phrase cannot break the FTS syntax.
        phrase = '"' + " ".join(words) + '"*'
        clause = f"job.id IN (SELECT rowid FROM {FTS_TABLE} WHERE {FTS_TABLE} MATCH :caption_query)"
        return text(clause).bindparams(caption_query=phrase)
    return col(Job.caption).ilike("%" + "%".join(words) + "%")
