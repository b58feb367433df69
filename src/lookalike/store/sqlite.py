"""The embedded store: one SQLite database (``catalog.db``) in WAL mode in the catalog folder.

Durability: every write is one ``BEGIN IMMEDIATE`` ... ``COMMIT`` transaction, so a crash (even
``kill -9``) leaves either the whole batch or none of it. WAL mode lets readers (an API server)
read while one writer writes; ``synchronous=NORMAL`` keeps committed transactions across an
application crash (the last ones may be lost on a power cut, SQLite docs, "WAL mode").

Schema version 1 (see ``DESIGN.md``, "Data model"): ``features`` keyed by
``(listing_id, image_id)`` and indexed in that order, so a listing's rows are read contiguously;
``listings``; ``query_results`` keyed by ``(query_id, rank)``; ``deletions`` (tombstones for
the change sequence); ``meta`` (schema version, model, sequence counter).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LookalikeError, NotFoundError
from ..types import (
    Changes,
    FeatureBatch,
    ImageRecord,
    Key,
    MatchRecord,
    ModelInfo,
    SavedHit,
)
from . import results
from .listings import SqliteListings
from .records import RECORD_COLUMNS, record_from_row
from .reindex import SQLITE_SCHEMA as REINDEX_SCHEMA
from .reindex import SqliteReindex, parse_model
from .watch import SQLITE_SCHEMA, SqliteWatch

DB_NAME = "catalog.db"
SCHEMA_VERSION = 1
PAGE_SIZE = 16384  # bytes, for new catalogs (see SqliteStore.__init__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS features (
    listing_id  TEXT NOT NULL,
    image_id    TEXT NOT NULL,
    vector      BLOB NOT NULL,
    model       TEXT NOT NULL,
    source      TEXT,
    sha256      TEXT NOT NULL,
    width       INTEGER,
    height      INTEGER,
    ingested_at REAL NOT NULL,
    labels      TEXT,
    seq         INTEGER NOT NULL,
    PRIMARY KEY (listing_id, image_id)
);
CREATE INDEX IF NOT EXISTS features_seq ON features (seq);
CREATE INDEX IF NOT EXISTS features_image_id ON features (image_id);
CREATE TABLE IF NOT EXISTS deletions (
    seq INTEGER NOT NULL, listing_id TEXT NOT NULL, image_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS deletions_seq ON deletions (seq);
CREATE TABLE IF NOT EXISTS listings (
    listing_id  TEXT PRIMARY KEY,
    stock_level INTEGER,
    etag        TEXT,
    attrs       TEXT,
    updated_at  REAL,
    seq         INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS listings_seq ON listings (seq);
CREATE TABLE IF NOT EXISTS image_analysis (
    listing_id       TEXT NOT NULL,
    image_id         TEXT NOT NULL,
    cluster          INTEGER,
    cluster_distance REAL,
    outlier_score    REAL,
    x                REAL,
    y                REAL,
    updated_at       REAL NOT NULL,
    PRIMARY KEY (listing_id, image_id)
);
CREATE TABLE IF NOT EXISTS query_results (
    query_id   TEXT NOT NULL,
    rank       INTEGER NOT NULL,
    listing_id TEXT NOT NULL,
    image_id   TEXT NOT NULL,
    score      REAL NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (query_id, rank)
);
"""

_CHUNK = 400  # keys per query, well under SQLite's 32766 host-parameter limit
_JOIN_KEYS = "f.listing_id = k.l AND f.image_id = k.i"  # the primary key, searched per key


def _plain(value: Any) -> Any:
    """numpy scalars -> Python numbers for sqlite3; None stays None."""
    return value.item() if hasattr(value, "item") else value


class SqliteStore(SqliteListings, SqliteReindex, SqliteWatch):
    """:class:`~lookalike.store.Store` on SQLite. Thread-safe (one connection, one lock).

    Args:
        folder: catalog folder; the database is ``folder/catalog.db``.
        create: create the folder and schema when missing.

    Raises:
        NotFoundError: no catalog at ``folder`` and ``create`` is False.
        LookalikeError: the database is of a newer schema version.
    """

    def __init__(self, folder: str | os.PathLike[str], create: bool = True) -> None:
        self.folder = Path(folder)
        self.path = self.folder / DB_NAME
        if not self.path.exists():
            if not create:
                raise NotFoundError(f"{self.folder}: no catalog here (no {DB_NAME})")
            self.folder.mkdir(parents=True, exist_ok=True)
        self.uri = str(self.folder)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=60.0
        )
        self._conn.execute("PRAGMA busy_timeout = 60000")
        # A new database only (SQLite fixes the page size when it writes the first page, and
        # WAL mode keeps it): a 512-d float32 row is about 2.2 KB, so 4 KiB pages held one row
        # each (4.2 KB a row); 16 KiB pages hold seven (sqlite.org/pragma.html#pragma_page_size).
        self._conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        self._set_wal()
        self._conn.execute("PRAGMA synchronous = NORMAL")
        with self._lock:
            self._conn.executescript(
                "BEGIN IMMEDIATE;" + _SCHEMA + "INSERT OR IGNORE INTO meta VALUES "
                f"('schema_version', '{SCHEMA_VERSION}'), ('seq', '0');"
                + SQLITE_SCHEMA
                + REINDEX_SCHEMA
                + "COMMIT;"
            )
        version = int(self._meta("schema_version") or 0)
        if version > SCHEMA_VERSION:
            raise LookalikeError(
                f"{self.path}: schema version {version} is newer than this lookalike "
                f"({SCHEMA_VERSION}); upgrade lookalike"
            )

    # ------------------------------------------------------------------ plumbing

    def _set_wal(self, wait: float = 60.0) -> None:
        """Switch the database to WAL mode, retrying while another process holds a lock.

        Changing the journal mode needs an exclusive lock, and when two connections race for
        it (two processes opening a new catalog at once) SQLite answers ``SQLITE_BUSY`` at once
        instead of calling the busy handler, to avoid a deadlock (sqlite.org/lockingv3.html,
        "deadlock"). So the pragma is retried, every 50 ms, for up to ``wait`` seconds.

        Raises:
            sqlite3.OperationalError: still locked after ``wait`` seconds, or another error.
        """
        deadline = time.monotonic() + wait
        while True:
            try:
                self._conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Cursor]:
        """One write transaction; rolled back on any exception."""
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Cursor]:
        """A consistent snapshot for multi-statement reads."""
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN")
            try:
                yield cur
            finally:
                cur.execute("COMMIT")

    def _meta(self, key: str) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    @staticmethod
    def _next_seq(cur: sqlite3.Cursor) -> int:
        cur.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'seq'")
        return int(cur.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0])

    def _in_chunks(self, keys: Sequence[Key]) -> Iterator[tuple[str, list[str]]]:
        """``(WITH clause, parameters)`` of up to :data:`_CHUNK` keys: a CTE ``k(l, i)`` to
        join as the outer loop (``k CROSS JOIN features f ON ...``). SQLite does not use the
        primary key for a row-value ``(listing_id, image_id) IN (VALUES ...)``: that scanned
        every row (22 s a call on a 1M-row catalog); the join searches the index per key."""
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start : start + _CHUNK]
            placeholders = ",".join(["(?, ?)"] * len(chunk))
            params = [part for key in chunk for part in key]
            yield f"WITH k(l, i) AS (VALUES {placeholders}) ", params

    # ------------------------------------------------------------------ model

    def model(self) -> ModelInfo | None:
        """The collection's model, or None for an empty new catalog."""
        return parse_model(self._meta("model"))

    def claim_model(self, info: ModelInfo) -> ModelInfo:
        """Record ``info`` as the collection's model if none is set; return the stored one."""
        with self._write() as cur:
            cur.execute(
                "INSERT OR IGNORE INTO meta VALUES ('model', ?)",
                (json.dumps({"name": info.name, "version": info.version, "dim": info.dim}),),
            )
        stored = self.model()
        assert stored is not None
        return stored

    def settings(self) -> dict[str, str]:
        """Catalog settings (engine codes, rerank factor, ...), as strings."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT key, value FROM meta WHERE key LIKE 'setting:%'"
            ).fetchall()
        return {k.removeprefix("setting:"): v for k, v in rows}

    def set_setting(self, key: str, value: str | None) -> None:
        """Store a catalog setting (None removes it)."""
        with self._write() as cur:
            if value is None:
                cur.execute("DELETE FROM meta WHERE key = ?", (f"setting:{key}",))
            else:
                cur.execute(
                    "INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET "
                    "value = excluded.value",
                    (f"setting:{key}", value),
                )

    # ------------------------------------------------------------------ features

    def existing(self, keys: Sequence[Key]) -> dict[Key, str]:
        """SHA-256 of those of ``keys`` that are stored."""
        found: dict[Key, str] = {}
        with self._lock:
            for with_keys, params in self._in_chunks(keys):
                rows = self._conn.execute(
                    f"{with_keys}SELECT f.listing_id, f.image_id, f.sha256 FROM k "
                    f"CROSS JOIN features f ON {_JOIN_KEYS}",
                    params,
                ).fetchall()
                found.update(((r[0], r[1]), r[2]) for r in rows)
        return found

    def upsert(self, batch: FeatureBatch, matches: Sequence[MatchRecord] = ()) -> int:
        """Insert or replace ``batch`` (and record ``matches``: :mod:`.watch`) in one
        transaction; returns the number of rows written."""
        if len(batch) == 0:
            return 0
        vectors = np.ascontiguousarray(batch.vectors, dtype="<f4")
        now = time.time()
        with self._write() as cur:
            seq = self._next_seq(cur)
            tag = self._write_tag(cur, batch)  # the model checked in this transaction
            cur.executemany(
                "INSERT INTO features (listing_id, image_id, vector, model, source, sha256, "
                "width, height, ingested_at, labels, seq) VALUES (?,?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT (listing_id, image_id) DO UPDATE SET vector = excluded.vector, "
                "model = excluded.model, source = excluded.source, sha256 = excluded.sha256, "
                "width = excluded.width, height = excluded.height, "
                "ingested_at = excluded.ingested_at, labels = excluded.labels, seq = excluded.seq",
                [
                    (
                        batch.listing_ids[i],
                        batch.image_ids[i],
                        vectors[i].tobytes(),
                        tag,
                        batch.sources[i],
                        batch.sha256s[i],
                        batch.widths[i],
                        batch.heights[i],
                        now,
                        json.dumps(batch.labels[i]) if batch.labels[i] is not None else None,
                        seq,
                    )
                    for i in range(len(batch))
                ],
            )
            cur.executemany(
                "INSERT OR IGNORE INTO listings (listing_id, updated_at) VALUES (?, ?)",
                [(lid, now) for lid in dict.fromkeys(batch.listing_ids)],
            )
            self._insert_matches(cur, matches, seq)
        return len(batch)

    def delete(self, keys: Sequence[Key]) -> int:
        """Delete rows in one transaction, leaving tombstones; returns how many existed."""
        if not keys:
            return 0
        with self._write() as cur:
            seq = self._next_seq(cur)
            deleted = 0
            for with_keys, params in self._in_chunks(list(dict.fromkeys(keys))):
                rows = cur.execute(
                    f"{with_keys}DELETE FROM features WHERE rowid IN (SELECT f.rowid FROM k "
                    f"CROSS JOIN features f ON {_JOIN_KEYS}) RETURNING listing_id, image_id",
                    params,
                ).fetchall()
                cur.executemany(
                    "INSERT INTO deletions VALUES (?, ?, ?)", [(seq, r[0], r[1]) for r in rows]
                )
                deleted += len(rows)
        return deleted

    def changes_since(self, seq: int) -> Changes:
        """Rows written and deleted after ``seq`` (``0``: everything), in one snapshot."""
        with self._read() as cur:
            high = int(cur.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0])
            raw = cur.execute("SELECT value FROM meta WHERE key = 'model'").fetchone()
            if seq == 0:
                rows = cur.execute(
                    "SELECT listing_id, image_id, vector FROM features "
                    "ORDER BY listing_id, image_id"
                ).fetchall()
                deleted: list[Key] = []
            else:
                # INDEXED BY: with ORDER BY (listing_id, image_id) the planner would walk the
                # primary key over every row instead of the few new ones; sort them here
                rows = sorted(
                    cur.execute(
                        "SELECT listing_id, image_id, vector FROM features INDEXED BY features_seq "
                        "WHERE seq > ?",
                        (seq,),
                    ).fetchall()
                )
                deleted = [
                    (r[0], r[1])
                    for r in cur.execute(
                        "SELECT listing_id, image_id FROM deletions WHERE seq > ? ORDER BY seq",
                        (seq,),
                    )
                ]
        model = parse_model(raw[0] if raw else None)
        dim = model.dim if model else 0
        if rows:
            vectors = np.frombuffer(b"".join(r[2] for r in rows), dtype="<f4").reshape(
                len(rows), -1
            )
        else:
            vectors = np.zeros((0, dim), dtype=np.float32)
        return Changes(
            seq=high,
            upserted=[(r[0], r[1]) for r in rows],
            vectors=vectors.astype(np.float32, copy=False),
            deleted=deleted,
            model=model,
        )

    def get(self, key: Key) -> ImageRecord | None:
        """One stored image, or None."""
        with self._lock:
            r = self._conn.execute(
                f"SELECT {RECORD_COLUMNS} FROM features WHERE listing_id = ? AND image_id = ?",
                key,
            ).fetchone()
        return None if r is None else record_from_row(r)

    def iter_records(self, batch_size: int = 1024) -> Iterator[list[ImageRecord]]:
        """Every stored image, ordered by ``(listing_id, image_id)``, ``batch_size`` rows a
        batch (keyset pagination: one query per batch, no lock held between batches)."""
        for rows in self._pages(RECORD_COLUMNS, batch_size):
            yield [record_from_row(r) for r in rows]

    def iter_vectors(self, batch_size: int = 65536) -> Iterator[tuple[list[Key], np.ndarray]]:
        """Every stored row as ``(keys, (m, d) float32)`` batches of at most ``batch_size``,
        ordered by ``(listing_id, image_id)`` (keyset pagination: one query a batch, no lock
        held between batches; a row written meanwhile may or may not be seen, so read
        :meth:`seq` before and apply ``changes_since`` of it after)."""
        for rows in self._pages("listing_id, image_id, vector", batch_size):
            keys = [(r[0], r[1]) for r in rows]
            yield keys, np.frombuffer(b"".join(r[2] for r in rows), "<f4").reshape(len(rows), -1)

    def _pages(self, columns: str, batch_size: int) -> Iterator[list[Any]]:
        """``columns`` (the first two ``listing_id, image_id``) of every row, ordered by key,
        ``batch_size`` rows a page."""
        last: Key | None = None
        while True:
            with self._lock:
                if last is None:
                    rows = self._conn.execute(
                        f"SELECT {columns} FROM features ORDER BY listing_id, image_id LIMIT ?",
                        (batch_size,),
                    ).fetchall()
                else:
                    rows = self._conn.execute(
                        f"SELECT {columns} FROM features "
                        "WHERE (listing_id, image_id) > (?, ?) "
                        "ORDER BY listing_id, image_id LIMIT ?",
                        (*last, batch_size),
                    ).fetchall()
            if not rows:
                return
            yield rows
            last = (rows[-1][0], rows[-1][1])

    def seq(self) -> int:
        """The newest change-sequence number (the ``seq`` :meth:`changes_since` reports)."""
        return int(self._meta("seq") or 0)

    def find_image(self, image_id: str) -> list[Key]:
        """Keys of every row whose ``image_id`` equals ``image_id``."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT listing_id, image_id FROM features WHERE image_id = ? ORDER BY listing_id",
                (image_id,),
            ).fetchall()
        return [(r[0], r[1]) for r in rows]

    def all_sha256(self) -> dict[Key, str]:
        """SHA-256 of every stored image."""
        with self._lock:
            rows = self._conn.execute("SELECT listing_id, image_id, sha256 FROM features")
            return {(r[0], r[1]): r[2] for r in rows}

    def all_sources(self) -> dict[Key, str | None]:
        """The recorded source (path, URL) of every stored image."""
        with self._lock:
            rows = self._conn.execute("SELECT listing_id, image_id, source FROM features")
            return {(r[0], r[1]): r[2] for r in rows}

    def count(self) -> int:
        """Number of rows in ``features``."""
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM features").fetchone()[0])

    def count_listings(self) -> int:
        """Number of distinct ``listing_id`` in ``features`` (a scan of the primary key)."""
        with self._lock:
            sql = "SELECT COUNT(DISTINCT listing_id) FROM features"
            return int(self._conn.execute(sql).fetchone()[0])

    # ------------------------------------------------------------------ analysis

    def save_analysis(self, keys: Sequence[Key], columns: dict[str, Sequence[Any]]) -> None:
        """Set analysis columns (``cluster``, ``cluster_distance``, ``outlier_score``, ``x``,
        ``y``) for ``keys`` (one transaction; other columns of those rows are kept)."""
        allowed = ("cluster", "cluster_distance", "outlier_score", "x", "y")
        names = [c for c in columns if c in allowed]
        if len(names) != len(columns):
            raise ValueError(f"analysis columns are {', '.join(allowed)}")
        if not keys or not names:
            return
        now = time.time()
        sets = ", ".join(f"{c} = excluded.{c}" for c in names)
        with self._write() as cur:
            cur.executemany(
                f"INSERT INTO image_analysis (listing_id, image_id, {', '.join(names)}, "
                f"updated_at) VALUES (?, ?, {', '.join('?' * len(names))}, ?) "
                f"ON CONFLICT (listing_id, image_id) DO UPDATE SET {sets}, "
                "updated_at = excluded.updated_at",
                [
                    (k[0], k[1], *(_plain(columns[c][i]) for c in names), now)
                    for i, k in enumerate(keys)
                ],
            )

    def analysis(self) -> dict[Key, dict[str, Any]]:
        """Stored analysis of every image that still exists."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT a.listing_id, a.image_id, a.cluster, a.cluster_distance, "
                "a.outlier_score, a.x, a.y FROM image_analysis a JOIN features f "
                "ON f.listing_id = a.listing_id AND f.image_id = a.image_id"
            ).fetchall()
        names = ("cluster", "cluster_distance", "outlier_score", "x", "y")
        return {(r[0], r[1]): dict(zip(names, r[2:], strict=True)) for r in rows}

    # ------------------------------------------------------------------ query results

    def save_results(self, query_id: str, hits: Sequence[tuple[str, str, float]]) -> None:
        """Write hits, best first, under ``query_id`` (rank 1 = best); one transaction."""
        now = time.time()
        with self._write() as cur:
            cur.executemany(
                "INSERT INTO query_results VALUES (?,?,?,?,?,?)",
                [
                    (query_id, rank, lid, iid, float(score), now)
                    for rank, (lid, iid, score) in enumerate(hits, start=1)
                ],
            )

    def get_results(self, query_id: str) -> list[SavedHit]:
        """Hits saved under ``query_id``, best first."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT query_id, rank, listing_id, image_id, score, created_at "
                "FROM query_results WHERE query_id = ? ORDER BY rank",
                (query_id,),
            ).fetchall()
        return [SavedHit(*r) for r in rows]

    def all_results(self) -> list[SavedHit]:
        """Every saved query result, by query and rank."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT query_id, rank, listing_id, image_id, score, created_at "
                "FROM query_results ORDER BY query_id, rank"
            ).fetchall()
        return [SavedHit(*r) for r in rows]

    def delete_results(
        self,
        *,
        query_id: str | None = None,
        before: float | None = None,
        limit: int | None = None,
    ) -> int:
        """Delete saved results (see :func:`lookalike.store.results.delete_results`)."""
        with self._write() as cur:
            if before is not None:
                results.ensure_index(cur, postgres=False)
            return results.delete_results(cur, False, query_id=query_id, before=before, limit=limit)

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._conn.close()
