"""A second model generation beside the live one: what ``lookalike reindex`` writes while the
catalog keeps answering from its current rows, and the one transaction that switches.

Tables (created when a reindex begins: ``features_next``; with the schema: the others;
PostgreSQL: migration ``0004_reindex.sql``):

* ``features_next``: a table like ``features`` (the same columns, made from its definition)
  holding the rows of the target model: each live row re-extracted, its other columns copied
  from the live row *as it was when its vector was made*, ``seq`` included. A row is **done**
  when its ``seq`` equals the live row's; a live row written again since (new bytes, a replay)
  has a newer ``seq`` and is due again, so writes that arrive during a reindex are caught up by
  asking for the rows that are not done (``seq > s`` for the newest ones).
* ``reindex_failed``: live rows that could not be re-extracted from their write ``src_seq``,
  with the reason.
* ``reindex_bytes``: the encoded bytes of images written from bytes (HTTP uploads, the stream)
  *while a reindex runs* (``FeatureBatch.blobs``, kept by ``upsert`` in the write's own
  transaction), so that they can be re-extracted although no file holds them.
* ``meta`` key ``reindex``: the target model, the model it replaces and when it started.

**The swap** (:meth:`SqliteReindex.reindex_swap`) runs under the store's write lock (SQLite
``BEGIN IMMEDIATE``; PostgreSQL: the ``seq`` counter row every writer takes first). When every
live row is done (or failed, and ``drop_missing``), it renames ``features_next`` to ``features``
(the old table is dropped), records the new model, re-points watchlist entries taken from
stored images, drops settings that belong to the old vectors and clears the per-image analysis,
in one transaction: no vector is copied, so the swap costs a check of the rows and two index
builds, not a rewrite of the collection (PostgreSQL copies the vectors in one ``UPDATE``
instead, :mod:`lookalike.store.reindex_pg` says why). When a write slipped in, nothing
changes and the caller catches up and tries again. Readers see the old model or the new one,
never a mix: a reader's next :meth:`changes_since` carries the new model
(:attr:`Changes.model`), and a cache of another model starts over.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import LookalikeError, ModelMismatchError
from ..types import FeatureBatch, Key, ModelInfo

#: The SQLite tables of a reindex besides ``features_next`` (created with the rest of the
#: schema; ``IF NOT EXISTS`` adds them to a catalog made before they existed).
SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS reindex_failed (
    listing_id TEXT NOT NULL,
    image_id   TEXT NOT NULL,
    src_seq    INTEGER NOT NULL,
    reason     TEXT NOT NULL,
    PRIMARY KEY (listing_id, image_id)
);
CREATE TABLE IF NOT EXISTS reindex_bytes (
    listing_id TEXT NOT NULL,
    image_id   TEXT NOT NULL,
    sha256     TEXT NOT NULL,
    data       BLOB NOT NULL,
    PRIMARY KEY (listing_id, image_id)
);
"""

#: Live rows joined with their new row (``n``) and their failure (``x``), if any.
JOIN_NEXT = (
    "FROM features f LEFT JOIN features_next n "
    "ON n.listing_id = f.listing_id AND n.image_id = f.image_id AND n.seq = f.seq "
    "LEFT JOIN reindex_failed x "
    "ON x.listing_id = f.listing_id AND x.image_id = f.image_id AND x.src_seq = f.seq"
)
#: Live rows with neither a new row nor a failure of their current write.
NOT_DONE = "n.seq IS NULL AND x.src_seq IS NULL"
TODO_SELECT = (
    "SELECT f.listing_id, f.image_id, f.seq, f.source, f.sha256, b.data "
    f"{JOIN_NEXT} LEFT JOIN reindex_bytes b ON b.listing_id = f.listing_id "
    "AND b.image_id = f.image_id AND b.sha256 = f.sha256"
)
#: New rows copied from a live row: the vector and model are new, the rest is the live row's.
COPY_COLUMNS = "source, sha256, width, height, ingested_at, labels, seq"
#: New rows of keys that are no longer live (deleted meanwhile): left out of the swap.
NEXT_GONE = (
    "DELETE FROM features_next WHERE (listing_id, image_id) IN (SELECT n.listing_id, "
    "n.image_id FROM features_next n WHERE NOT EXISTS (SELECT 1 FROM features f "
    "WHERE f.listing_id = n.listing_id AND f.image_id = n.image_id))"
)  # keys only: both primary keys cover it, no row (vector) is read
#: Live rows that failed, with the reason (after :data:`NEXT_GONE`, when nothing is pending).
FAILED_SELECT = (
    "SELECT x.listing_id, x.image_id, x.reason FROM reindex_failed x JOIN features f "
    "ON f.listing_id = x.listing_id AND f.image_id = x.image_id AND f.seq = x.src_seq "
    "ORDER BY x.listing_id, x.image_id"
)
#: Watchlist entries that get no new vector: not taken from a stored image that has one.
WATCH_STALE = (
    "SELECT w.name, w.entry_id FROM watchlists w WHERE NOT EXISTS (SELECT 1 FROM "
    "features_next n WHERE n.listing_id = w.ref_listing_id AND n.image_id = w.ref_image_id) "
    "ORDER BY w.name, w.entry_id"
)
#: The counts of :meth:`SqliteReindex.reindex_progress`: live rows, done, failed.
PROGRESS_SELECT = f"SELECT COUNT(*), COUNT(n.seq), COUNT(x.src_seq) {JOIN_NEXT}"


#: The error of a second reindex of one catalog.
BUSY = "another `lookalike reindex` of this catalog is running"


def model_json(model: ModelInfo) -> str:
    """A model as the ``meta`` JSON every backend stores."""
    return json.dumps({"name": model.name, "version": model.version, "dim": model.dim})


def parse_model(raw: str | None) -> ModelInfo | None:
    """The :class:`ModelInfo` of a ``meta`` JSON value (None for None)."""
    if raw is None:
        return None
    d = json.loads(raw)
    return ModelInfo(d["name"], d["version"], int(d["dim"]))


@dataclass
class ReindexItem:
    """A stored image that the running reindex still has to re-extract.

    Attributes:
        seq: the live row's change sequence number (the new row records it as ``src_seq``).
        source: the path or URL it was read from, or None.
        sha256: hex SHA-256 of its bytes (a source that no longer hashes to it is not used).
        data: its bytes, when they were kept (written from bytes during the reindex).
    """

    listing_id: str
    image_id: str
    seq: int
    source: str | None
    sha256: str
    data: bytes | None = None

    @property
    def key(self) -> Key:
        """``(listing_id, image_id)``."""
        return (self.listing_id, self.image_id)


@dataclass
class ReindexRow:
    """One re-extracted row for ``features_next``: its ``(d,) float32`` vector of the target
    model, or None with the ``reason`` it could not be made; ``seq`` as in
    :class:`ReindexItem`."""

    listing_id: str
    image_id: str
    seq: int
    vector: np.ndarray | None
    reason: str = ""


@dataclass
class ReindexProgress:
    """Where a reindex stands.

    Attributes:
        model: the target model. replaces: the live model (None: the catalog is empty).
        started_at: Unix time, seconds. seq: the store's change sequence now.
        total: live rows. done: rows re-extracted from their current write.
        failed: rows whose current write could not be re-extracted (``reason`` stored).
    """

    model: ModelInfo
    replaces: ModelInfo | None
    started_at: float
    total: int
    done: int
    failed: int
    seq: int

    @property
    def pending(self) -> int:
        """Rows still to re-extract."""
        return self.total - self.done - self.failed


@dataclass
class SwapOutcome:
    """What :meth:`SqliteReindex.reindex_swap` did.

    Attributes:
        swapped: whether the catalog now holds the target model.
        pending: rows not re-extracted from their current write (nothing changed then).
        missing: ``(key, reason)`` of rows that could not be re-extracted; removed when
            ``drop_missing``, else nothing changed.
        watch_missing: ``(watchlist, entry_id)`` of entries that get no new vector (not taken
            from a stored image that has one); removed with ``drop_missing``.
        seq: the change sequence number of the swap.
        watch_updated: entries re-pointed to their stored image's new vector.
        settings_dropped: settings removed (they belonged to the old vectors).
        analysis_cleared: per-image analysis rows removed (clusters, outliers, map).
    """

    swapped: bool
    pending: int = 0
    missing: list[tuple[Key, str]] = field(default_factory=list)
    watch_missing: list[tuple[str, str]] = field(default_factory=list)
    seq: int = 0
    watch_updated: int = 0
    settings_dropped: list[str] = field(default_factory=list)
    analysis_cleared: int = 0


def reindex_state(raw: str | None) -> tuple[ModelInfo, ModelInfo | None, float] | None:
    """``(target, replaced model, started_at)`` of the ``meta`` value ``reindex`` (None: no
    reindex in progress)."""
    if raw is None:
        return None
    d = json.loads(raw)
    target = parse_model(json.dumps(d["model"]))
    assert target is not None
    replaces = parse_model(json.dumps(d["replaces"])) if d.get("replaces") else None
    return target, replaces, float(d["started_at"])


def state_json(target: ModelInfo, replaces: ModelInfo | None) -> str:
    """The ``meta`` value ``reindex`` of a reindex to ``target`` starting now."""
    return json.dumps(
        {
            "model": json.loads(model_json(target)),
            "replaces": json.loads(model_json(replaces)) if replaces else None,
            "started_at": time.time(),
        }
    )


def checked_tag(stored: ModelInfo | None, batch: FeatureBatch) -> str:
    """The model tag to write ``batch``'s rows with, read in the write's transaction.

    Raises:
        ModelMismatchError: the catalog holds another model than the batch's now.
    """
    if stored is not None and batch.model is not None and stored != batch.model:
        raise ModelMismatchError(
            f"the catalog now holds vectors of {stored.tag} (d={stored.dim}); refusing "
            f"vectors of {batch.model.tag} (d={batch.model.dim}): it was reindexed meanwhile"
        )
    return stored.tag if stored else ""


def kept_blobs(batch: FeatureBatch) -> list[tuple[str, str, str, bytes]]:
    """``(listing_id, image_id, sha256, bytes)`` of the rows of ``batch`` that carry bytes."""
    blobs = batch.blobs or []
    return [
        (batch.listing_ids[i], batch.image_ids[i], batch.sha256s[i], data)
        for i, data in enumerate(blobs)
        if data is not None
    ]


def no_reindex(target: ModelInfo) -> LookalikeError:
    """The error of a swap or write for a reindex that is not in progress."""
    return LookalikeError(f"no reindex to {target.tag} is in progress in this catalog")


class SqliteReindex:
    """The reindex generation of :class:`~lookalike.store.sqlite.SqliteStore` (a mixin over
    the store's connection, lock and write transaction; module docstring)."""

    _conn: Any
    _lock: Any
    folder: Path

    if TYPE_CHECKING:

        def _write(self) -> AbstractContextManager[Any]: ...

        def _read(self) -> AbstractContextManager[Any]: ...

        @staticmethod
        def _next_seq(cur: Any) -> int: ...

        @staticmethod
        def _bump_watch_seq(cur: Any) -> None: ...

    # ------------------------------------------------------------------ the write path

    def _write_tag(self, cur: Any, batch: FeatureBatch) -> str:
        """In ``upsert``'s transaction: check the model, keep the bytes a reindex needs, and
        return the tag to write (see :func:`checked_tag`)."""
        rows = dict(cur.execute("SELECT key, value FROM meta WHERE key IN ('model', 'reindex')"))
        tag = checked_tag(parse_model(rows.get("model")), batch)
        if "reindex" in rows and batch.blobs:
            cur.executemany(
                "INSERT OR REPLACE INTO reindex_bytes VALUES (?, ?, ?, ?)", kept_blobs(batch)
            )
        return tag

    # ------------------------------------------------------------------ reindex

    @contextlib.contextmanager
    def reindex_lock(self) -> Iterator[None]:
        """Hold the catalog's reindex lock (an ``flock`` on ``<folder>/reindex.lock``, released
        when the process dies).

        Raises:
            LookalikeError: another reindex of this catalog is running.
        """
        with open(self.folder / "reindex.lock", "a+b") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LookalikeError(BUSY) from None
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def reindex_begin(self, target: ModelInfo) -> ReindexProgress:
        """Start a reindex to ``target`` (an empty ``features_next`` made from the definition
        of ``features``), or continue the one in progress when it has the same target (one
        started for another target is discarded)."""
        with self._write() as cur:
            row = cur.execute("SELECT value FROM meta WHERE key = 'reindex'").fetchone()
            state = reindex_state(row[0] if row else None)
            if state is None or state[0] != target:
                ddl = cur.execute(
                    "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'features'"
                ).fetchone()[0]
                cur.execute("DROP TABLE IF EXISTS features_next")
                cur.execute(
                    re.sub(r'^CREATE TABLE "?features"?', "CREATE TABLE features_next", ddl)
                )
                cur.execute("DELETE FROM reindex_failed")
                cur.execute("DELETE FROM reindex_bytes")
                model = cur.execute("SELECT value FROM meta WHERE key = 'model'").fetchone()
                replaces = parse_model(model[0] if model else None)
                cur.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('reindex', ?)",
                    (state_json(target, replaces),),
                )
        progress = self.reindex_progress()
        assert progress is not None
        return progress

    def reindex_progress(self) -> ReindexProgress | None:
        """The reindex in progress, or None."""
        with self._read() as cur:
            row = cur.execute("SELECT value FROM meta WHERE key = 'reindex'").fetchone()
            state = reindex_state(row[0] if row else None)
            if state is None:
                return None
            total, done, failed = cur.execute(PROGRESS_SELECT).fetchone()
            seq = int(cur.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0])
        return ReindexProgress(*state, total=total, done=done, failed=failed, seq=seq)

    def reindex_todo(
        self,
        *,
        after: Key | None = None,
        since_seq: int = 0,
        retry_failed: bool = True,
        limit: int = 256,
    ) -> list[ReindexItem]:
        """Live rows still to re-extract, by key after ``after``, written after ``since_seq``;
        with ``retry_failed`` also those whose re-extraction failed; at most ``limit``."""
        where = ["n.seq IS NULL" if retry_failed else NOT_DONE]
        params: list[Any] = []
        if after is not None:
            where.append("(f.listing_id, f.image_id) > (?, ?)")
            params += list(after)
        if since_seq:
            where.append("f.seq > ?")
            params.append(since_seq)
        sql = f"{TODO_SELECT} WHERE {' AND '.join(where)} ORDER BY f.listing_id, f.image_id LIMIT ?"
        with self._lock:
            rows = self._conn.execute(sql, (*params, limit)).fetchall()
        return [ReindexItem(*r) for r in rows]

    def reindex_write(self, rows: Sequence[ReindexRow]) -> int:
        """Write re-extracted rows (one transaction): a vector becomes a new row with the live
        row's other columns, if the live row is still the write it was made from; a failure is
        recorded. Returns the rows given."""
        if not rows:
            return 0
        with self._write() as cur:
            state = cur.execute("SELECT value FROM meta WHERE key = 'reindex'").fetchone()
            target = reindex_state(state[0] if state else None)
            if target is None:
                raise LookalikeError("no reindex is in progress in this catalog")
            ok = [r for r in rows if r.vector is not None]
            bad = [r for r in rows if r.vector is None]
            cur.executemany(
                f"INSERT OR REPLACE INTO features_next (listing_id, image_id, vector, model, "
                f"{COPY_COLUMNS}) SELECT listing_id, image_id, ?, ?, {COPY_COLUMNS} FROM features "
                "WHERE listing_id = ? AND image_id = ? AND seq = ?",
                [
                    (vector_blob(r.vector), target[0].tag, r.listing_id, r.image_id, r.seq)
                    for r in ok
                ],
            )
            cur.executemany(
                "DELETE FROM reindex_failed WHERE listing_id = ? AND image_id = ?",
                [(r.listing_id, r.image_id) for r in ok],
            )
            cur.executemany(
                "INSERT OR REPLACE INTO reindex_failed VALUES (?, ?, ?, ?)",
                [(r.listing_id, r.image_id, r.seq, r.reason or "failed") for r in bad],
            )
            cur.executemany(
                "DELETE FROM features_next WHERE listing_id = ? AND image_id = ?",
                [(r.listing_id, r.image_id) for r in bad],
            )
        return len(rows)

    def reindex_abort(self) -> bool:
        """Discard the reindex in progress (its rows and kept bytes); False when none."""
        with self._write() as cur:
            gone = cur.execute("DELETE FROM meta WHERE key = 'reindex'").rowcount
            cur.execute("DROP TABLE IF EXISTS features_next")
            cur.execute("DELETE FROM reindex_failed")
            cur.execute("DELETE FROM reindex_bytes")
        return bool(gone)

    def reindex_swap(
        self, target: ModelInfo, drop_missing: bool = False, drop_settings: Sequence[str] = ()
    ) -> SwapOutcome:
        """Switch the catalog to ``target`` in one transaction, if every row is done (module
        docstring); ``drop_settings`` are removed with it.

        Raises:
            LookalikeError: no reindex to ``target`` is in progress.
        """
        with self._lock:
            # Debian's SQLite zeroes every freed page (SECURE_DELETE): dropping the old table
            # would write it all once more. FAST zeroes only what costs no extra I/O.
            secure = self._conn.execute("PRAGMA secure_delete").fetchone()[0]
            self._conn.execute("PRAGMA secure_delete = FAST")
            try:
                return self._swap(target, drop_missing, drop_settings)
            finally:
                self._conn.execute(f"PRAGMA secure_delete = {int(secure)}")

    def _swap(
        self, target: ModelInfo, drop_missing: bool, drop_settings: Sequence[str]
    ) -> SwapOutcome:
        with self._write() as cur:
            row = cur.execute("SELECT value FROM meta WHERE key = 'reindex'").fetchone()
            state = reindex_state(row[0] if row else None)
            if state is None or state[0] != target:
                raise no_reindex(target)
            pending = cur.execute(f"SELECT COUNT(*) {JOIN_NEXT} WHERE {NOT_DONE}").fetchone()[0]
            if pending:
                return SwapOutcome(False, pending=pending)
            cur.execute(NEXT_GONE)
            missing = [((r[0], r[1]), r[2]) for r in cur.execute(FAILED_SELECT)]
            stale = [(r[0], r[1]) for r in cur.execute(WATCH_STALE)]
            if (missing or stale) and not drop_missing:
                return SwapOutcome(False, missing=missing, watch_missing=stale)
            seq = self._next_seq(cur)  # the failed rows are not in the new table: tombstones
            cur.executemany(
                "INSERT INTO deletions VALUES (?, ?, ?)", [(seq, *k) for k, _ in missing]
            )
            cur.executemany("DELETE FROM watchlists WHERE name = ? AND entry_id = ?", stale)
            updated = cur.execute(
                "UPDATE watchlists SET vector = n.vector FROM features_next n "
                "WHERE n.listing_id = watchlists.ref_listing_id "
                "AND n.image_id = watchlists.ref_image_id"
            ).rowcount
            self._bump_watch_seq(cur)
            cur.execute("ALTER TABLE features RENAME TO features_old")
            cur.execute("ALTER TABLE features_next RENAME TO features")
            cur.execute("DROP TABLE features_old")  # and its indexes: made again below
            cur.execute("CREATE INDEX features_seq ON features (seq)")
            cur.execute("CREATE INDEX features_image_id ON features (image_id)")
            cur.execute("INSERT OR REPLACE INTO meta VALUES ('model', ?)", (model_json(target),))
            dropped = [
                name
                for name in drop_settings
                if cur.execute("DELETE FROM meta WHERE key = ?", (f"setting:{name}",)).rowcount
            ]
            cleared = cur.execute("DELETE FROM image_analysis").rowcount
            cur.execute("DELETE FROM reindex_failed")
            cur.execute("DELETE FROM reindex_bytes")
            cur.execute("DELETE FROM meta WHERE key = 'reindex'")
        return SwapOutcome(True, 0, missing, stale, seq, updated, dropped, cleared)


def vector_blob(vector: np.ndarray | None) -> bytes | None:
    """A vector as the stores keep it: float32 little-endian bytes."""
    return None if vector is None else np.asarray(vector, "<f4").tobytes()
