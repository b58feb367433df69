"""The server-grade store: PostgreSQL through psycopg 3 with a connection pool.

``open_catalog("postgresql://user@host/db")`` (or ``LOOKALIKE_CATALOG``) selects it. The tables
are those of the SQLite store (``DESIGN.md``), created by versioned migrations: plain SQL files
in ``migrations/postgres`` applied in order under an advisory lock, recorded in
``schema_migrations``.

* **Bulk writes** go through ``COPY ... FROM STDIN (FORMAT BINARY)`` into a temporary table,
  then one ``INSERT ... ON CONFLICT DO UPDATE``: idempotent upserts, one transaction per batch.
* **Several processes** (stream consumers, API servers) share one catalog: every write
  transaction takes the next value of the ``counters`` row ``seq`` with ``UPDATE ...
  RETURNING``, which serialises writers on that row, so the sequence order is the commit order
  and a reader that has applied everything up to ``s`` misses nothing by asking for
  ``seq > s`` (deletes leave tombstones with their sequence number). Readers read in one
  ``REPEATABLE READ`` snapshot and never wait for writers.
* Files that belong to a catalog but not in a database (ANN indexes, thumbnails, classifier
  models) live in a local state folder: ``LOOKALIKE_STATE_DIR/<hash of the URL>``, default
  ``~/.cache/lookalike/catalogs/<hash>``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LookalikeError
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
from .listings import PostgresListings
from .records import RECORD_COLUMNS, record_from_row
from .reindex import parse_model
from .reindex_pg import PostgresReindex
from .watch import PostgresWatch

_LOCK_ID = 0x6C6F6F6B  # advisory lock key for migrations ("look")


def state_folder(url: str) -> Path:
    """The local folder for a PostgreSQL catalog's files (indexes, thumbnails, models)."""
    safe = re.sub(r"//[^@/]*@", "//", url)  # no password in the hash input
    digest = hashlib.sha256(safe.encode()).hexdigest()[:16]
    base = os.environ.get("LOOKALIKE_STATE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "lookalike",
        "catalogs",
    )
    return Path(base) / digest


def _migrations() -> list[tuple[int, str]]:
    folder = resources.files("lookalike.store") / "migrations" / "postgres"
    out = []
    for entry in folder.iterdir():
        m = re.match(r"^(\d+)_.*\.sql$", entry.name)
        if m:
            out.append((int(m.group(1)), entry.read_text(encoding="utf-8")))
    return sorted(out)


class PostgresStore(PostgresListings, PostgresReindex, PostgresWatch):
    """:class:`~lookalike.store.Store` on PostgreSQL (see the module docstring).

    Args:
        url: ``postgresql://user[:password]@host[:port]/database``.
        pool_size: most connections held.

    Raises:
        LookalikeError: cannot connect, or the database has a newer schema.
    """

    def __init__(self, url: str, pool_size: int = 4) -> None:
        from psycopg_pool import ConnectionPool

        self.uri = re.sub(r"//([^:@/]*):[^@/]*@", r"//\1@", url)  # never show a password
        self.folder = state_folder(url)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._results_indexed = False  # the query_results created_at index (store/results.py)
        try:
            self.pool = ConnectionPool(
                url,
                min_size=1,
                max_size=pool_size,
                open=True,
                timeout=30,
                kwargs={"connect_timeout": 10},
            )
            self.pool.wait(timeout=30)
        except Exception as exc:
            raise LookalikeError(f"cannot connect to {self.uri}: {exc}") from None
        self._migrate()

    # ------------------------------------------------------------------ plumbing

    @contextmanager
    def _tx(self, read_only: bool = False) -> Iterator[Any]:
        """One transaction (REPEATABLE READ snapshot when read-only); rolled back on error."""
        with self.pool.connection() as conn, conn.transaction():
            if read_only:
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            with conn.cursor() as cur:
                yield cur

    def _migrate(self) -> None:
        with self._tx() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
            cur.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
            )
            cur.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            current = cur.fetchone()[0]
            known = _migrations()
            if known and current > known[-1][0]:
                raise LookalikeError(
                    f"{self.uri}: schema version {current} is newer than this "
                    "lookalike; upgrade lookalike"
                )
            for version, sql in known:
                if version > current:
                    cur.execute(sql)
                    cur.execute(
                        "INSERT INTO schema_migrations VALUES (%s, %s)", (version, time.time())
                    )

    @staticmethod
    def _next_seq(cur: Any) -> int:
        cur.execute("UPDATE counters SET value = value + 1 WHERE name = 'seq' RETURNING value")
        return int(cur.fetchone()[0])

    @staticmethod
    def _keys(keys: Sequence[Key]) -> tuple[list[str], list[str]]:
        return [k[0] for k in keys], [k[1] for k in keys]

    def _meta(self, key: str) -> str | None:
        with self._tx(read_only=True) as cur:
            cur.execute("SELECT value FROM meta WHERE key = %s", (key,))
            row = cur.fetchone()
        return row[0] if row else None

    # ------------------------------------------------------------------ model & settings

    def model(self) -> ModelInfo | None:
        """The collection's model, or None for an empty new catalog."""
        return parse_model(self._meta("model"))

    def claim_model(self, info: ModelInfo) -> ModelInfo:
        """Record ``info`` as the collection's model if none is set; return the stored one."""
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO meta VALUES ('model', %s) ON CONFLICT (key) DO NOTHING",
                (json.dumps({"name": info.name, "version": info.version, "dim": info.dim}),),
            )
        stored = self.model()
        assert stored is not None
        return stored

    def settings(self) -> dict[str, str]:
        """Catalog settings, as strings."""
        with self._tx(read_only=True) as cur:
            cur.execute("SELECT key, value FROM meta WHERE key LIKE 'setting:%%'")
            return {k.removeprefix("setting:"): v for k, v in cur.fetchall()}

    def set_setting(self, key: str, value: str | None) -> None:
        """Store a catalog setting (None removes it)."""
        with self._tx() as cur:
            if value is None:
                cur.execute("DELETE FROM meta WHERE key = %s", (f"setting:{key}",))
            else:
                cur.execute(
                    "INSERT INTO meta VALUES (%s, %s) ON CONFLICT (key) DO UPDATE "
                    "SET value = excluded.value",
                    (f"setting:{key}", value),
                )

    # ------------------------------------------------------------------ features

    def existing(self, keys: Sequence[Key]) -> dict[Key, str]:
        """SHA-256 of those of ``keys`` that are stored."""
        if not keys:
            return {}
        lids, iids = self._keys(keys)
        with self._tx(read_only=True) as cur:
            cur.execute(
                "SELECT f.listing_id, f.image_id, f.sha256 FROM features f JOIN "
                "unnest(%s::text[], %s::text[]) AS k(l, i) ON f.listing_id = k.l "
                "AND f.image_id = k.i",
                (lids, iids),
            )
            return {(r[0], r[1]): r[2] for r in cur.fetchall()}

    def upsert(self, batch: FeatureBatch, matches: Sequence[MatchRecord] = ()) -> int:
        """Insert or replace ``batch``: binary COPY into a temporary table, then one
        ``INSERT ... ON CONFLICT``, in one transaction (with ``matches`` recorded:
        :mod:`.watch`). Returns the rows written."""
        from psycopg.types.json import Jsonb

        n = len(batch)
        if n == 0:
            return 0
        vectors = np.ascontiguousarray(batch.vectors, dtype="<f4")
        now = time.time()
        last: dict[Key, int] = {}  # a key twice in one batch: the last one wins
        for i in range(n):
            last[(batch.listing_ids[i], batch.image_ids[i])] = i
        with self._tx() as cur:
            seq = self._next_seq(cur)
            tag = self._write_tag(cur, batch)  # the model checked after the counter row
            cur.execute("CREATE TEMP TABLE staging (LIKE features) ON COMMIT DROP")
            with cur.copy(
                "COPY staging (listing_id, image_id, vector, model, source, sha256, width, "
                "height, ingested_at, labels, seq) FROM STDIN (FORMAT BINARY)"
            ) as copy:
                copy.set_types(
                    [
                        "text",
                        "text",
                        "bytea",
                        "text",
                        "text",
                        "text",
                        "int4",
                        "int4",
                        "float8",
                        "jsonb",
                        "int8",
                    ]
                )
                for i in sorted(last.values()):
                    lab = batch.labels[i]
                    copy.write_row(
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
                            Jsonb(lab) if lab is not None else None,
                            seq,
                        )
                    )
            cur.execute(
                "INSERT INTO features SELECT * FROM staging ON CONFLICT (listing_id, image_id) "
                "DO UPDATE SET vector = excluded.vector, model = excluded.model, "
                "source = excluded.source, sha256 = excluded.sha256, width = excluded.width, "
                "height = excluded.height, ingested_at = excluded.ingested_at, "
                "labels = excluded.labels, seq = excluded.seq"
            )
            cur.execute(
                "INSERT INTO listings (listing_id, updated_at) SELECT DISTINCT "
                "listing_id, %s FROM staging ON CONFLICT (listing_id) DO NOTHING",
                (now,),
            )
            self._insert_matches(cur, matches, seq)
        return n

    def delete(self, keys: Sequence[Key]) -> int:
        """Delete rows in one transaction, leaving tombstones; returns how many existed."""
        if not keys:
            return 0
        lids, iids = self._keys(keys)
        with self._tx() as cur:
            seq = self._next_seq(cur)
            cur.execute(
                "WITH gone AS (DELETE FROM features f USING unnest(%s::text[], %s::text[]) "
                "AS k(l, i) WHERE f.listing_id = k.l AND f.image_id = k.i "
                "RETURNING f.listing_id, f.image_id) "
                "INSERT INTO deletions SELECT %s, listing_id, image_id FROM gone",
                (lids, iids, seq),
            )
            return int(cur.rowcount)

    def changes_since(self, seq: int) -> Changes:
        """Rows written and deleted after ``seq`` (``0``: everything), in one snapshot."""
        with self._tx(read_only=True) as cur:
            cur.execute("SELECT value FROM counters WHERE name = 'seq'")
            high = int(cur.fetchone()[0])
            cur.execute("SELECT value FROM meta WHERE key = 'model'")
            raw = cur.fetchone()
            if seq == 0:
                cur.execute(
                    "SELECT listing_id, image_id, vector FROM features "
                    "ORDER BY listing_id, image_id",
                    binary=True,
                )
                rows = cur.fetchall()
                deleted: list[Key] = []
            else:
                cur.execute(
                    "SELECT listing_id, image_id, vector FROM features WHERE seq > %s "
                    "ORDER BY listing_id, image_id",
                    (seq,),
                    binary=True,
                )
                rows = cur.fetchall()
                cur.execute(
                    "SELECT listing_id, image_id FROM deletions WHERE seq > %s ORDER BY seq", (seq,)
                )
                deleted = [(r[0], r[1]) for r in cur.fetchall()]
        model = parse_model(raw[0] if raw else None)
        dim = model.dim if model else 0
        if rows:
            vectors = np.frombuffer(b"".join(bytes(r[2]) for r in rows), dtype="<f4").reshape(
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
        with self._tx(read_only=True) as cur:
            cur.execute(
                f"SELECT {RECORD_COLUMNS} FROM features WHERE listing_id = %s AND image_id = %s",
                key,
            )
            r = cur.fetchone()
        return None if r is None else record_from_row(r)

    def iter_records(self, batch_size: int = 1024) -> Iterator[list[ImageRecord]]:
        """Every stored image, ordered by ``(listing_id, image_id)``, ``batch_size`` rows a
        batch (keyset pagination: one query and one short transaction per batch)."""
        for rows in self._pages(RECORD_COLUMNS, batch_size, binary=False):
            yield [record_from_row(r) for r in rows]

    def iter_vectors(self, batch_size: int = 65536) -> Iterator[tuple[list[Key], np.ndarray]]:
        """Every stored row as ``(keys, (m, d) float32)`` batches of at most ``batch_size``,
        ordered by ``(listing_id, image_id)`` (keyset pagination: one query and one short
        transaction a batch; a row written meanwhile may or may not be seen, so read
        :meth:`seq` before and apply ``changes_since`` of it after)."""
        for rows in self._pages("listing_id, image_id, vector", batch_size, binary=True):
            keys = [(r[0], r[1]) for r in rows]
            flat = b"".join(bytes(r[2]) for r in rows)
            yield keys, np.frombuffer(flat, "<f4").reshape(len(rows), -1)

    def _pages(self, columns: str, batch_size: int, binary: bool) -> Iterator[list[Any]]:
        """``columns`` (the first two ``listing_id, image_id``) of every row, ordered by key,
        ``batch_size`` rows a page."""
        last: Key | None = None
        while True:
            with self._tx(read_only=True) as cur:
                if last is None:
                    cur.execute(
                        f"SELECT {columns} FROM features ORDER BY listing_id, image_id LIMIT %s",
                        (batch_size,),
                        binary=binary,
                    )
                else:
                    cur.execute(
                        f"SELECT {columns} FROM features "
                        "WHERE (listing_id, image_id) > (%s, %s) "
                        "ORDER BY listing_id, image_id LIMIT %s",
                        (*last, batch_size),
                        binary=binary,
                    )
                rows = cur.fetchall()
            if not rows:
                return
            yield rows
            last = (rows[-1][0], rows[-1][1])

    def seq(self) -> int:
        """The newest change-sequence number (the ``seq`` :meth:`changes_since` reports)."""
        with self._tx(read_only=True) as cur:
            cur.execute("SELECT value FROM counters WHERE name = 'seq'")
            return int(cur.fetchone()[0])

    def find_image(self, image_id: str) -> list[Key]:
        """Keys of every row whose ``image_id`` equals ``image_id``."""
        with self._tx(read_only=True) as cur:
            cur.execute(
                "SELECT listing_id, image_id FROM features WHERE image_id = %s ORDER BY listing_id",
                (image_id,),
            )
            return [(r[0], r[1]) for r in cur.fetchall()]

    def count(self) -> int:
        """Number of rows in ``features``."""
        with self._tx(read_only=True) as cur:
            cur.execute("SELECT COUNT(*) FROM features")
            return int(cur.fetchone()[0])

    def count_listings(self) -> int:
        """Number of distinct ``listing_id`` in ``features``."""
        with self._tx(read_only=True) as cur:
            cur.execute("SELECT COUNT(DISTINCT listing_id) FROM features")
            return int(cur.fetchone()[0])

    def all_sha256(self) -> dict[Key, str]:
        """SHA-256 of every stored image."""
        with self._tx(read_only=True) as cur:
            cur.execute("SELECT listing_id, image_id, sha256 FROM features")
            return {(r[0], r[1]): r[2] for r in cur.fetchall()}

    def all_sources(self) -> dict[Key, str | None]:
        """The recorded source of every stored image."""
        with self._tx(read_only=True) as cur:
            cur.execute("SELECT listing_id, image_id, source FROM features")
            return {(r[0], r[1]): r[2] for r in cur.fetchall()}

    # ------------------------------------------------------------------ analysis & results

    def save_analysis(self, keys: Sequence[Key], columns: dict[str, Sequence[Any]]) -> None:
        """Set analysis columns for ``keys`` (one transaction)."""
        allowed = ("cluster", "cluster_distance", "outlier_score", "x", "y")
        names = [c for c in columns if c in allowed]
        if len(names) != len(columns):
            raise ValueError(f"analysis columns are {', '.join(allowed)}")
        if not keys or not names:
            return
        now = time.time()
        sets = ", ".join(f"{c} = excluded.{c}" for c in names)
        with self._tx() as cur:
            cur.executemany(
                f"INSERT INTO image_analysis (listing_id, image_id, {', '.join(names)}, "
                f"updated_at) VALUES (%s, %s, {', '.join(['%s'] * len(names))}, %s) "
                f"ON CONFLICT (listing_id, image_id) DO UPDATE SET {sets}, "
                "updated_at = excluded.updated_at",
                [
                    (k[0], k[1], *(_plain(columns[c][i]) for c in names), now)
                    for i, k in enumerate(keys)
                ],
            )

    def analysis(self) -> dict[Key, dict[str, Any]]:
        """Stored analysis of every image that still exists."""
        with self._tx(read_only=True) as cur:
            cur.execute(
                "SELECT a.listing_id, a.image_id, a.cluster, a.cluster_distance, "
                "a.outlier_score, a.x, a.y FROM image_analysis a JOIN features f "
                "ON f.listing_id = a.listing_id AND f.image_id = a.image_id"
            )
            rows = cur.fetchall()
        names = ("cluster", "cluster_distance", "outlier_score", "x", "y")
        return {(r[0], r[1]): dict(zip(names, r[2:], strict=True)) for r in rows}

    def save_results(self, query_id: str, hits: Sequence[tuple[str, str, float]]) -> None:
        """Write hits, best first, under ``query_id`` (rank 1 = best); one transaction."""
        now = time.time()
        with self._tx() as cur:
            cur.executemany(
                "INSERT INTO query_results VALUES (%s, %s, %s, %s, %s, %s)",
                [
                    (query_id, rank, lid, iid, float(score), now)
                    for rank, (lid, iid, score) in enumerate(hits, start=1)
                ],
            )

    def get_results(self, query_id: str) -> list[SavedHit]:
        """Hits saved under ``query_id``, best first."""
        with self._tx(read_only=True) as cur:
            cur.execute(
                "SELECT query_id, rank, listing_id, image_id, score, created_at "
                "FROM query_results WHERE query_id = %s ORDER BY rank",
                (query_id,),
            )
            return [SavedHit(*r) for r in cur.fetchall()]

    def all_results(self) -> list[SavedHit]:
        """Every saved query result, by query and rank."""
        with self._tx(read_only=True) as cur:
            cur.execute(
                "SELECT query_id, rank, listing_id, image_id, score, created_at "
                "FROM query_results ORDER BY query_id, rank"
            )
            return [SavedHit(*r) for r in cur.fetchall()]

    def delete_results(
        self,
        *,
        query_id: str | None = None,
        before: float | None = None,
        limit: int | None = None,
    ) -> int:
        """Delete saved results (see :func:`lookalike.store.results.delete_results`)."""
        with self._tx() as cur:
            if before is not None and not self._results_indexed:
                results.ensure_index(cur, postgres=True)
            n = results.delete_results(cur, True, query_id=query_id, before=before, limit=limit)
        self._results_indexed = self._results_indexed or before is not None
        return n

    def close(self) -> None:
        """Close the pool."""
        self.pool.close()


def _plain(value: Any) -> Any:
    """numpy scalars -> Python numbers; None stays None."""
    return value.item() if hasattr(value, "item") else value
