"""The reindex generation on PostgreSQL (:class:`PostgresReindex`, mixed into
:class:`~lookalike.store.postgres.PostgresStore`): the same tables and steps as the SQLite one
(:mod:`lookalike.store.reindex`, which explains them; ``reindex_failed`` and ``reindex_bytes``
from migration ``0004_reindex.sql``), except the swap itself.

**The swap** copies each new row's vector and model into the live row (one ``UPDATE ...
FROM``), giving every row the swap's ``seq``, instead of renaming the tables: PostgreSQL
resolves a table's name from the newest catalog even in an older snapshot, so a reader whose
snapshot predates a rename could read part of the new table; an ``UPDATE`` is seen by each
snapshot wholly or not at all. Writers wait for it (it holds the ``seq`` counter row);
readers never do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from ..errors import LookalikeError
from ..types import FeatureBatch, Key, ModelInfo
from .reindex import (
    BUSY,
    COPY_COLUMNS,
    FAILED_SELECT,
    JOIN_NEXT,
    NEXT_GONE,
    NOT_DONE,
    PROGRESS_SELECT,
    TODO_SELECT,
    WATCH_STALE,
    ReindexItem,
    ReindexProgress,
    ReindexRow,
    SwapOutcome,
    checked_tag,
    kept_blobs,
    model_json,
    no_reindex,
    parse_model,
    reindex_state,
    state_json,
    vector_blob,
)

_LOCK_ID = 0x6C6F6F6C  # the advisory lock of a running reindex ("lool")


class PostgresReindex:
    """The reindex generation of :class:`~lookalike.store.postgres.PostgresStore` (a mixin
    over the store's transactions; the tables come from migration ``0004_reindex.sql``)."""

    pool: Any

    if TYPE_CHECKING:

        def _tx(self, read_only: bool = False) -> AbstractContextManager[Any]: ...

        @staticmethod
        def _next_seq(cur: Any) -> int: ...

    def _write_tag(self, cur: Any, batch: FeatureBatch) -> str:
        """In ``upsert``'s transaction (after the ``seq`` counter row is taken, so a swap has
        committed or waits): check the model, keep the bytes a reindex needs, and return the
        tag to write (see :func:`checked_tag`)."""
        cur.execute("SELECT key, value FROM meta WHERE key IN ('model', 'reindex')")
        rows = dict(cur.fetchall())
        tag = checked_tag(parse_model(rows.get("model")), batch)
        if "reindex" in rows and batch.blobs:
            cur.executemany(
                "INSERT INTO reindex_bytes VALUES (%s, %s, %s, %s) ON CONFLICT (listing_id, "
                "image_id) DO UPDATE SET sha256 = excluded.sha256, data = excluded.data",
                kept_blobs(batch),
            )
        return tag

    @contextlib.contextmanager
    def reindex_lock(self) -> Iterator[None]:
        """Hold the catalog's reindex lock (a session advisory lock on one pooled connection,
        released when the connection ends).

        Raises:
            LookalikeError: another reindex of this catalog is running.
        """
        with self.pool.connection() as conn:
            got = conn.execute("SELECT pg_try_advisory_lock(%s)", (_LOCK_ID,)).fetchone()[0]
            conn.commit()
            if not got:
                raise LookalikeError(BUSY)
            try:
                yield
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_ID,))
                conn.commit()

    def reindex_begin(self, target: ModelInfo) -> ReindexProgress:
        """As :meth:`SqliteReindex.reindex_begin` (``features_next`` made ``LIKE features``)."""
        with self._tx() as cur:
            cur.execute("SELECT value FROM meta WHERE key = 'reindex' FOR UPDATE")
            row = cur.fetchone()
            state = reindex_state(row[0] if row else None)
            if state is None or state[0] != target:
                cur.execute("DROP TABLE IF EXISTS features_next")
                cur.execute(
                    "CREATE TABLE features_next (LIKE features INCLUDING DEFAULTS, "
                    "PRIMARY KEY (listing_id, image_id))"
                )
                cur.execute("DELETE FROM reindex_failed")
                cur.execute("DELETE FROM reindex_bytes")
                cur.execute("SELECT value FROM meta WHERE key = 'model'")
                model = cur.fetchone()
                cur.execute(
                    "INSERT INTO meta VALUES ('reindex', %s) ON CONFLICT (key) DO UPDATE "
                    "SET value = excluded.value",
                    (state_json(target, parse_model(model[0] if model else None)),),
                )
        progress = self.reindex_progress()
        assert progress is not None
        return progress

    def reindex_progress(self) -> ReindexProgress | None:
        """As :meth:`SqliteReindex.reindex_progress`."""
        with self._tx(read_only=True) as cur:
            cur.execute("SELECT value FROM meta WHERE key = 'reindex'")
            row = cur.fetchone()
            state = reindex_state(row[0] if row else None)
            if state is None:
                return None
            cur.execute(PROGRESS_SELECT)
            total, done, failed = cur.fetchone()
            cur.execute("SELECT value FROM counters WHERE name = 'seq'")
            seq = int(cur.fetchone()[0])
        return ReindexProgress(*state, total=total, done=done, failed=failed, seq=seq)

    def reindex_todo(
        self,
        *,
        after: Key | None = None,
        since_seq: int = 0,
        retry_failed: bool = True,
        limit: int = 256,
    ) -> list[ReindexItem]:
        """As :meth:`SqliteReindex.reindex_todo`."""
        where = ["n.seq IS NULL" if retry_failed else NOT_DONE]
        params: list[Any] = []
        if after is not None:
            where.append("(f.listing_id, f.image_id) > (%s, %s)")
            params += list(after)
        if since_seq:
            where.append("f.seq > %s")
            params.append(since_seq)
        sql = (
            f"{TODO_SELECT} WHERE {' AND '.join(where)} ORDER BY f.listing_id, f.image_id LIMIT %s"
        )
        with self._tx(read_only=True) as cur:
            cur.execute(sql, (*params, limit))
            rows = cur.fetchall()
        return [ReindexItem(r[0], r[1], int(r[2]), r[3], r[4], _bytes(r[5])) for r in rows]

    def reindex_write(self, rows: Sequence[ReindexRow]) -> int:
        """As :meth:`SqliteReindex.reindex_write`."""
        if not rows:
            return 0
        with self._tx() as cur:
            cur.execute("SELECT value FROM meta WHERE key = 'reindex'")
            state = cur.fetchone()
            target = reindex_state(state[0] if state else None)
            if target is None:
                raise LookalikeError("no reindex is in progress in this catalog")
            ok = [r for r in rows if r.vector is not None]
            bad = [r for r in rows if r.vector is None]
            sets = ", ".join(
                f"{c} = excluded.{c}" for c in ("vector", "model", *COPY_COLUMNS.split(", "))
            )
            cur.executemany(
                f"INSERT INTO features_next (listing_id, image_id, vector, model, {COPY_COLUMNS}) "
                f"SELECT listing_id, image_id, %s, %s, {COPY_COLUMNS} FROM features "
                "WHERE listing_id = %s AND image_id = %s AND seq = %s "
                f"ON CONFLICT (listing_id, image_id) DO UPDATE SET {sets}",
                [
                    (vector_blob(r.vector), target[0].tag, r.listing_id, r.image_id, r.seq)
                    for r in ok
                ],
            )
            keys = [(r.listing_id, r.image_id) for r in ok]
            cur.executemany(
                "DELETE FROM reindex_failed WHERE listing_id = %s AND image_id = %s", keys
            )
            cur.executemany(
                "INSERT INTO reindex_failed VALUES (%s, %s, %s, %s) ON CONFLICT (listing_id, "
                "image_id) DO UPDATE SET src_seq = excluded.src_seq, reason = excluded.reason",
                [(r.listing_id, r.image_id, r.seq, r.reason or "failed") for r in bad],
            )
            cur.executemany(
                "DELETE FROM features_next WHERE listing_id = %s AND image_id = %s",
                [(r.listing_id, r.image_id) for r in bad],
            )
        return len(rows)

    def reindex_abort(self) -> bool:
        """As :meth:`SqliteReindex.reindex_abort`."""
        with self._tx() as cur:
            cur.execute("DELETE FROM meta WHERE key = 'reindex'")
            gone = cur.rowcount
            cur.execute("DROP TABLE IF EXISTS features_next")
            cur.execute("DELETE FROM reindex_failed")
            cur.execute("DELETE FROM reindex_bytes")
        return bool(gone)

    def reindex_swap(
        self, target: ModelInfo, drop_missing: bool = False, drop_settings: Sequence[str] = ()
    ) -> SwapOutcome:
        """As :meth:`SqliteReindex.reindex_swap`, by an ``UPDATE`` (module docstring); the
        ``seq`` counter row is taken first, so every writer waits for the swap and reads the
        new model after it."""
        try:
            return self._swap(target, drop_missing, drop_settings)
        except _NoSwapError as no:  # rolled back: the counter too
            return no.outcome

    def _swap(
        self, target: ModelInfo, drop_missing: bool, drop_settings: Sequence[str]
    ) -> SwapOutcome:
        with self._tx() as cur:
            seq = self._next_seq(cur)
            cur.execute("SELECT value FROM meta WHERE key = 'reindex'")
            row = cur.fetchone()
            state = reindex_state(row[0] if row else None)
            if state is None or state[0] != target:
                raise no_reindex(target)
            cur.execute(f"SELECT COUNT(*) {JOIN_NEXT} WHERE {NOT_DONE}")
            pending = int(cur.fetchone()[0])
            if pending:
                raise _NoSwapError(SwapOutcome(False, pending=pending))
            cur.execute(NEXT_GONE)
            cur.execute(FAILED_SELECT)
            missing = [((r[0], r[1]), r[2]) for r in cur.fetchall()]
            cur.execute(WATCH_STALE)
            stale = [(r[0], r[1]) for r in cur.fetchall()]
            if (missing or stale) and not drop_missing:
                raise _NoSwapError(SwapOutcome(False, missing=missing, watch_missing=stale))
            cur.execute(
                "WITH gone AS (DELETE FROM features f USING reindex_failed x WHERE "
                "x.listing_id = f.listing_id AND x.image_id = f.image_id AND x.src_seq = f.seq "
                "RETURNING f.listing_id, f.image_id) "
                "INSERT INTO deletions SELECT %s, listing_id, image_id FROM gone",
                (seq,),
            )
            cur.execute(
                "UPDATE features f SET vector = n.vector, model = n.model, seq = %s FROM "
                "features_next n WHERE n.listing_id = f.listing_id AND n.image_id = f.image_id",
                (seq,),
            )
            cur.executemany("DELETE FROM watchlists WHERE name = %s AND entry_id = %s", stale)
            cur.execute(
                "UPDATE watchlists w SET vector = n.vector FROM features_next n "
                "WHERE n.listing_id = w.ref_listing_id AND n.image_id = w.ref_image_id"
            )
            updated = cur.rowcount
            cur.execute("UPDATE counters SET value = value + 1 WHERE name = 'watch_seq'")
            cur.execute(
                "INSERT INTO meta VALUES ('model', %s) ON CONFLICT (key) DO UPDATE "
                "SET value = excluded.value",
                (model_json(target),),
            )
            dropped = []
            for name in drop_settings:
                cur.execute("DELETE FROM meta WHERE key = %s", (f"setting:{name}",))
                if cur.rowcount:
                    dropped.append(name)
            cur.execute("DELETE FROM image_analysis")
            cleared = cur.rowcount
            cur.execute("DROP TABLE features_next")
            cur.execute("DELETE FROM reindex_failed")
            cur.execute("DELETE FROM reindex_bytes")
            cur.execute("DELETE FROM meta WHERE key = 'reindex'")
        return SwapOutcome(True, 0, missing, stale, seq, updated, dropped, cleared)


class _NoSwapError(Exception):
    """Leaves a swap's transaction without a change (it is rolled back)."""

    def __init__(self, outcome: SwapOutcome) -> None:
        super().__init__("not swapped")
        self.outcome = outcome


def _bytes(value: Any) -> bytes | None:
    return None if value is None else bytes(value)
