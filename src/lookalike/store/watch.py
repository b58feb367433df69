"""Watchlists and matches in the store: the ``watchlists`` and ``matches`` tables of
``DESIGN.md`` ("Data model"), for SQLite (:class:`SqliteWatch`) and PostgreSQL
(:class:`PostgresWatch`), mixed into the two store classes.

* ``watchlists``: one row per ``(name, entry_id)``: the reference vector (float32 blob,
  L2-normalized), its threshold, where it came from. Every change bumps the **watch
  sequence** (``meta`` key ``watch_seq`` in SQLite, ``counters`` row ``watch_seq`` in
  PostgreSQL), which a catalog reads before each write batch (one tiny query) to know whether
  its in-RAM copy of the watchlists is still current.
* ``matches``: one row per (arriving image, watchlist entry) or (arriving image, catalog hit),
  unique by ``(event_id, target)`` (:attr:`lookalike.types.MatchRecord.target`), so recording
  the same match twice is a no-op. Rows of a watchlist written with the image (the ``matches``
  argument of ``upsert``) commit **in the same transaction** as the image. The table is the
  **outbox** of the match events: ``published_at`` is NULL until a publisher marks the row
  (a partial index keeps that scan small). ``seq`` is the store's change sequence of the write
  that recorded the row, i.e. commit order, so a reader tailing ``seq > s`` misses nothing.
  One write's rows share its ``seq``: a reader that stops inside a write resumes after the
  ``(seq, id)`` it saw last (``after_id``), rows being read in ``(seq, id)`` order.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import numpy as np

from ..types import MatchRecord, WatchEntry

#: The SQLite tables (created with the rest of the schema; ``IF NOT EXISTS`` adds them to a
#: catalog made before they existed).
SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS watchlists (
    name           TEXT NOT NULL,
    entry_id       TEXT NOT NULL,
    vector         BLOB NOT NULL,
    threshold      REAL NOT NULL,
    source         TEXT,
    ref_listing_id TEXT,
    ref_image_id   TEXT,
    created_at     REAL NOT NULL,
    PRIMARY KEY (name, entry_id)
);
CREATE TABLE IF NOT EXISTS matches (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id       TEXT NOT NULL,
    target         TEXT NOT NULL,
    listing_id     TEXT NOT NULL,
    image_id       TEXT NOT NULL,
    sha256         TEXT NOT NULL,
    watchlist      TEXT,
    entry_id       TEXT,
    hit_listing_id TEXT,
    hit_image_id   TEXT,
    score          REAL NOT NULL,
    matched_at     REAL NOT NULL,
    published_at   REAL,
    seq            INTEGER NOT NULL,
    UNIQUE (event_id, target)
);
CREATE INDEX IF NOT EXISTS matches_seq ON matches (seq);
CREATE INDEX IF NOT EXISTS matches_watchlist ON matches (watchlist, seq);
CREATE INDEX IF NOT EXISTS matches_outbox ON matches (id) WHERE published_at IS NULL;
INSERT OR IGNORE INTO meta VALUES ('watch_seq', '0');
"""

_ENTRY_COLUMNS = (
    "name, entry_id, vector, threshold, source, ref_listing_id, ref_image_id, created_at"
)
_MATCH_COLUMNS = (
    "event_id, listing_id, image_id, sha256, watchlist, entry_id, hit_listing_id, "
    "hit_image_id, score, matched_at, published_at, seq, id"
)
#: Most rows one ``matches`` read answers.
MAX_MATCH_ROWS = 10_000


def _entry(r: Sequence[Any]) -> WatchEntry:
    return WatchEntry(
        name=r[0],
        entry_id=r[1],
        vector=np.frombuffer(bytes(r[2]), dtype="<f4").astype(np.float32),
        threshold=float(r[3]),
        source=r[4],
        ref_listing_id=r[5],
        ref_image_id=r[6],
        created_at=float(r[7]),
    )


def _match(r: Sequence[Any]) -> MatchRecord:
    return MatchRecord(
        event_id=r[0],
        listing_id=r[1],
        image_id=r[2],
        sha256=r[3],
        watchlist=r[4],
        entry_id=r[5],
        hit_listing_id=r[6],
        hit_image_id=r[7],
        score=float(r[8]),
        matched_at=float(r[9]),
        published_at=None if r[10] is None else float(r[10]),
        seq=int(r[11]),
        id=int(r[12]),
    )


def _entry_row(e: WatchEntry, now: float) -> tuple[Any, ...]:
    vector = np.ascontiguousarray(e.vector, dtype="<f4").tobytes()
    return (
        e.name,
        e.entry_id,
        vector,
        float(e.threshold),
        e.source,
        e.ref_listing_id,
        e.ref_image_id,
        now,
    )


def _match_row(m: MatchRecord, seq: int) -> tuple[Any, ...]:
    return (
        m.event_id,
        m.target,
        m.listing_id,
        m.image_id,
        m.sha256,
        m.watchlist,
        m.entry_id,
        m.hit_listing_id,
        m.hit_image_id,
        float(m.score),
        float(m.matched_at),
        m.published_at,
        seq,
    )


def _match_filter(
    watchlist: str | None, after_seq: int, after_id: int | None, unpublished: bool, mark: str
) -> tuple[str, list[Any]]:
    """``WHERE`` clause and parameters of a ``matches`` read (``mark``: the placeholder):
    rows after ``after_seq`` or, given ``after_id``, after ``(after_seq, after_id)``."""
    if after_id is None:
        where = [f"seq > {mark}"]
        params: list[Any] = [after_seq]
    else:  # "seq >= s" first, so that the index on seq narrows the scan
        where = [f"seq >= {mark} AND (seq > {mark} OR id > {mark})"]
        params = [after_seq, after_seq, after_id]
    if watchlist is not None:
        where.append(f"watchlist = {mark}")
        params.append(watchlist)
    if unpublished:
        where.append("published_at IS NULL")
    return " AND ".join(where), params


class SqliteWatch:
    """Watchlists and matches of :class:`~lookalike.store.sqlite.SqliteStore` (a mixin: it
    uses the store's connection, lock and write transaction)."""

    _conn: sqlite3.Connection
    _lock: Any

    if TYPE_CHECKING:

        def _write(self) -> AbstractContextManager[sqlite3.Cursor]: ...

        @staticmethod
        def _next_seq(cur: sqlite3.Cursor) -> int: ...

    @staticmethod
    def _bump_watch_seq(cur: sqlite3.Cursor) -> None:
        cur.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'watch_seq'")

    @staticmethod
    def _insert_matches(cur: sqlite3.Cursor, matches: Sequence[MatchRecord], seq: int) -> int:
        """Record ``matches`` in the transaction of ``cur`` (a row already there is kept)."""
        if not matches:
            return 0
        before = cur.connection.total_changes
        cur.executemany(
            "INSERT OR IGNORE INTO matches (event_id, target, listing_id, image_id, sha256, "
            "watchlist, entry_id, hit_listing_id, hit_image_id, score, matched_at, "
            "published_at, seq) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            [_match_row(m, seq) for m in matches],
        )
        return cur.connection.total_changes - before

    def watch_seq(self) -> int:
        """The watch sequence: bumped by every change of a watchlist."""
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'watch_seq'").fetchone()
        return int(row[0]) if row else 0

    def watch_entries(self, name: str | None = None) -> list[WatchEntry]:
        """Every watchlist entry (or those of ``name``), by name and entry id."""
        sql = f"SELECT {_ENTRY_COLUMNS} FROM watchlists"
        with self._lock:
            if name is None:
                rows = self._conn.execute(sql + " ORDER BY name, entry_id").fetchall()
            else:
                rows = self._conn.execute(
                    sql + " WHERE name = ? ORDER BY entry_id", (name,)
                ).fetchall()
        return [_entry(r) for r in rows]

    def add_watch_entries(self, entries: Sequence[WatchEntry]) -> int:
        """Insert or replace entries (by ``(name, entry_id)``) in one transaction; returns
        how many were written."""
        if not entries:
            return 0
        now = time.time()
        with self._write() as cur:
            cur.executemany(
                f"INSERT INTO watchlists ({_ENTRY_COLUMNS}) VALUES (?,?,?,?,?,?,?,?) "
                "ON CONFLICT (name, entry_id) DO UPDATE SET vector = excluded.vector, "
                "threshold = excluded.threshold, source = excluded.source, "
                "ref_listing_id = excluded.ref_listing_id, "
                "ref_image_id = excluded.ref_image_id, created_at = excluded.created_at",
                [_entry_row(e, now) for e in entries],
            )
            self._bump_watch_seq(cur)
        return len(entries)

    def remove_watch(self, name: str, entry_id: str | None = None) -> int:
        """Remove a watchlist (or one entry of it); returns the entries removed. Its matches
        stay (they are history)."""
        with self._write() as cur:
            if entry_id is None:
                cur.execute("DELETE FROM watchlists WHERE name = ?", (name,))
            else:
                cur.execute(
                    "DELETE FROM watchlists WHERE name = ? AND entry_id = ?", (name, entry_id)
                )
            removed = cur.rowcount
            self._bump_watch_seq(cur)
        return int(removed)

    def record_matches(self, matches: Sequence[MatchRecord]) -> int:
        """Record matches in their own transaction (idempotent by ``(event_id, target)``);
        returns how many were new."""
        if not matches:
            return 0
        with self._write() as cur:
            return self._insert_matches(cur, matches, self._next_seq(cur))

    def matches(
        self,
        watchlist: str | None = None,
        *,
        after_seq: int = 0,
        after_id: int | None = None,
        unpublished: bool = False,
        limit: int = 1000,
        newest: bool = False,
    ) -> list[MatchRecord]:
        """Recorded matches with ``seq > after_seq`` (given ``after_id``: after the row
        ``(after_seq, after_id)`` in ``(seq, id)`` order; of ``watchlist`` only, when given;
        still in the outbox only, with ``unpublished``), oldest first, at most ``limit``
        (capped at :data:`MAX_MATCH_ROWS`); ``newest``: the newest ``limit`` of them."""
        where, params = _match_filter(watchlist, after_seq, after_id, unpublished, "?")
        order = "DESC" if newest else ""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_MATCH_COLUMNS} FROM matches WHERE {where} "
                f"ORDER BY seq {order}, id {order} LIMIT ?",
                [*params, min(limit, MAX_MATCH_ROWS)],
            ).fetchall()
        out = [_match(r) for r in rows]
        return out[::-1] if newest else out

    def mark_published(self, ids: Sequence[int], when: float | None = None) -> None:
        """Take rows out of the outbox: set ``published_at`` (default now)."""
        if not ids:
            return
        stamp = time.time() if when is None else when
        with self._write() as cur:
            cur.executemany(
                "UPDATE matches SET published_at = ? WHERE id = ? AND published_at IS NULL",
                [(stamp, int(i)) for i in ids],
            )


class PostgresWatch:
    """Watchlists and matches of :class:`~lookalike.store.postgres.PostgresStore` (a mixin:
    it uses the store's transactions; the tables come from migration
    ``0003_watchlists.sql``)."""

    if TYPE_CHECKING:

        def _tx(self, read_only: bool = False) -> AbstractContextManager[Any]: ...

        @staticmethod
        def _next_seq(cur: Any) -> int: ...

    @staticmethod
    def _insert_matches(cur: Any, matches: Sequence[MatchRecord], seq: int) -> int:
        """Record ``matches`` in the transaction of ``cur`` (a row already there is kept)."""
        if not matches:
            return 0
        new = 0
        for row in _chunks([_match_row(m, seq) for m in matches], 500):
            cur.execute(
                "INSERT INTO matches (event_id, target, listing_id, image_id, sha256, "
                "watchlist, entry_id, hit_listing_id, hit_image_id, score, matched_at, "
                "published_at, seq) VALUES "
                + ", ".join(["(%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)"] * len(row))
                + " ON CONFLICT (event_id, target) DO NOTHING",
                [v for r in row for v in r],
            )
            new += int(cur.rowcount)
        return new

    def watch_seq(self) -> int:
        """The watch sequence: bumped by every change of a watchlist."""
        with self._tx(read_only=True) as cur:
            cur.execute("SELECT value FROM counters WHERE name = 'watch_seq'")
            row = cur.fetchone()
        return int(row[0]) if row else 0

    def watch_entries(self, name: str | None = None) -> list[WatchEntry]:
        """Every watchlist entry (or those of ``name``), by name and entry id."""
        sql = f"SELECT {_ENTRY_COLUMNS} FROM watchlists"
        with self._tx(read_only=True) as cur:
            if name is None:
                cur.execute(sql + " ORDER BY name, entry_id", binary=True)
            else:
                cur.execute(sql + " WHERE name = %s ORDER BY entry_id", (name,), binary=True)
            rows = cur.fetchall()
        return [_entry(r) for r in rows]

    def add_watch_entries(self, entries: Sequence[WatchEntry]) -> int:
        """Insert or replace entries (by ``(name, entry_id)``) in one transaction; returns
        how many were written."""
        if not entries:
            return 0
        now = time.time()
        with self._tx() as cur:
            cur.executemany(
                f"INSERT INTO watchlists ({_ENTRY_COLUMNS}) VALUES "
                "(%s,%s,%s,%s,%s,%s,%s,%s) "
                "ON CONFLICT (name, entry_id) DO UPDATE SET vector = excluded.vector, "
                "threshold = excluded.threshold, source = excluded.source, "
                "ref_listing_id = excluded.ref_listing_id, "
                "ref_image_id = excluded.ref_image_id, created_at = excluded.created_at",
                [_entry_row(e, now) for e in entries],
            )
            cur.execute("UPDATE counters SET value = value + 1 WHERE name = 'watch_seq'")
        return len(entries)

    def remove_watch(self, name: str, entry_id: str | None = None) -> int:
        """Remove a watchlist (or one entry of it); returns the entries removed. Its matches
        stay (they are history)."""
        with self._tx() as cur:
            if entry_id is None:
                cur.execute("DELETE FROM watchlists WHERE name = %s", (name,))
            else:
                cur.execute(
                    "DELETE FROM watchlists WHERE name = %s AND entry_id = %s", (name, entry_id)
                )
            removed = int(cur.rowcount)
            cur.execute("UPDATE counters SET value = value + 1 WHERE name = 'watch_seq'")
        return removed

    def record_matches(self, matches: Sequence[MatchRecord]) -> int:
        """Record matches in their own transaction (idempotent by ``(event_id, target)``);
        returns how many were new."""
        if not matches:
            return 0
        with self._tx() as cur:
            return self._insert_matches(cur, matches, self._next_seq(cur))

    def matches(
        self,
        watchlist: str | None = None,
        *,
        after_seq: int = 0,
        after_id: int | None = None,
        unpublished: bool = False,
        limit: int = 1000,
        newest: bool = False,
    ) -> list[MatchRecord]:
        """Recorded matches with ``seq > after_seq`` (given ``after_id``: after the row
        ``(after_seq, after_id)`` in ``(seq, id)`` order; of ``watchlist`` only, when given;
        still in the outbox only, with ``unpublished``), oldest first, at most ``limit``
        (capped at :data:`MAX_MATCH_ROWS`); ``newest``: the newest ``limit`` of them."""
        where, params = _match_filter(watchlist, after_seq, after_id, unpublished, "%s")
        order = "DESC" if newest else ""
        with self._tx(read_only=True) as cur:
            cur.execute(
                f"SELECT {_MATCH_COLUMNS} FROM matches WHERE {where} "
                f"ORDER BY seq {order}, id {order} LIMIT %s",
                [*params, min(limit, MAX_MATCH_ROWS)],
            )
            rows = cur.fetchall()
        out = [_match(r) for r in rows]
        return out[::-1] if newest else out

    def mark_published(self, ids: Sequence[int], when: float | None = None) -> None:
        """Take rows out of the outbox: set ``published_at`` (default now)."""
        if not ids:
            return
        stamp = time.time() if when is None else when
        with self._tx() as cur:
            cur.execute(
                "UPDATE matches SET published_at = %s WHERE id = ANY(%s) AND published_at IS NULL",
                (stamp, [int(i) for i in ids]),
            )


def _chunks(rows: list[tuple[Any, ...]], size: int) -> Iterator[list[tuple[Any, ...]]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]
