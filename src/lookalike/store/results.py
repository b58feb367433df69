"""Deleting saved search results (``query_results``): one query's, or every query saved before
a time. Shared by the SQLite and PostgreSQL stores, which call :func:`delete_results` inside
one of their write transactions.

A query's rows are written in one transaction with one ``created_at``, so a query is deleted
whole or not at all. Expiry reads an index on ``created_at`` (made on first use: ``CREATE
INDEX IF NOT EXISTS``, under an advisory lock on PostgreSQL, where concurrent creations of one
index would otherwise collide), so pruning costs the rows it deletes, not a scan of the table.
"""

from __future__ import annotations

from typing import Any

#: Query ids per ``IN (...)`` list.
_CHUNK = 400
#: Advisory lock key of the index creation on PostgreSQL ("qres").
_INDEX_LOCK = 0x71726573
INDEX_SQL = "CREATE INDEX IF NOT EXISTS query_results_created_at ON query_results (created_at)"


def ensure_index(cur: Any, postgres: bool) -> None:
    """Create the ``created_at`` index when missing (``cur``: a cursor in a write
    transaction, psycopg's when ``postgres``, else sqlite3's)."""
    if postgres:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (_INDEX_LOCK,))
    cur.execute(INDEX_SQL)


def delete_results(
    cur: Any,
    postgres: bool,
    *,
    query_id: str | None = None,
    before: float | None = None,
    limit: int | None = None,
) -> int:
    """Delete saved results with ``cur`` (a cursor in a write transaction): the rows of
    ``query_id``, or those of every query saved before ``before`` (Unix seconds), oldest
    first, at most ``limit`` queries.

    Args:
        postgres: the cursor is psycopg's (``%s`` parameters), else sqlite3's (``?``); SQLite
            is told to read the ``created_at`` index (``INDEXED BY``: without statistics its
            planner would rather scan the primary key to group by ``query_id``).

    Returns:
        The number of queries deleted.
    """
    mark = "%s" if postgres else "?"
    if query_id is not None:
        cur.execute(f"DELETE FROM query_results WHERE query_id = {mark}", (query_id,))
        return 1 if cur.rowcount > 0 else 0
    if before is None:
        return 0
    hint = "" if postgres else " INDEXED BY query_results_created_at"
    sql = (
        f"SELECT query_id FROM query_results{hint} WHERE created_at < {mark} "
        "GROUP BY query_id ORDER BY MIN(created_at)"
    )
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    cur.execute(sql, (before,))
    ids = [row[0] for row in cur.fetchall()]
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        marks = ", ".join([mark] * len(chunk))
        cur.execute(f"DELETE FROM query_results WHERE query_id IN ({marks})", chunk)
    return len(ids)
