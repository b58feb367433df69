"""The system of record behind one protocol: SQLite (embedded default); more backends plug in here.

A store keeps the three tables of ``DESIGN.md``: ``features`` (one row per
``(listing_id, image_id)``, vector as a float32 blob), ``listings`` (live attributes such as
``stock_level``) and ``query_results``, plus ``watchlists`` and ``matches``
(:mod:`lookalike.store.watch`). It knows nothing of models or images: it stores bytes, keys
and a change sequence.

**Change sequence.** Every write transaction takes the next value of a per-catalog counter;
rows it writes (and tombstones of rows it deletes) carry that value. An engine that has applied
everything up to ``seq`` asks :meth:`Store.changes_since` for the rest and stays in sync
incrementally, also with writes made by other processes.

**Reindex.** A second model generation is written beside the live rows and switched to in
one transaction (:mod:`lookalike.store.reindex`: ``reindex_begin`` ... ``reindex_swap``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..types import (
    Changes,
    FeatureBatch,
    ImageRecord,
    Key,
    ListingRecord,
    MatchRecord,
    ModelInfo,
    SavedHit,
    WatchEntry,
)
from .reindex import ReindexItem, ReindexProgress, ReindexRow, SwapOutcome


class Store(Protocol):
    """What every backend provides. Writes are atomic per call (one transaction)."""

    uri: str
    #: Local folder for the catalog's files (ANN indexes, thumbnails, classifier models).
    folder: Path

    def claim_model(self, info: ModelInfo) -> ModelInfo:
        """Record ``info`` as the collection's model if none is set; return the stored one."""
        ...

    def model(self) -> ModelInfo | None:
        """The collection's model, or None for an empty new catalog."""
        ...

    def settings(self) -> dict[str, str]:
        """Catalog settings (engine codes, rerank factor, ...), as strings."""
        ...

    def set_setting(self, key: str, value: str | None) -> None:
        """Store a catalog setting (None removes it)."""
        ...

    def existing(self, keys: Sequence[Key]) -> dict[Key, str]:
        """SHA-256 of those of ``keys`` that are stored."""
        ...

    def upsert(self, batch: FeatureBatch, matches: Sequence[MatchRecord] = ()) -> int:
        """Insert or replace rows, all in one transaction, recording ``matches`` (watchlist
        matches of these rows) in the same transaction; returns the number written."""
        ...

    def delete(self, keys: Sequence[Key]) -> int:
        """Delete rows (one transaction); returns how many existed."""
        ...

    def changes_since(self, seq: int) -> Changes:
        """Rows written and deleted after ``seq`` (``0``: everything)."""
        ...

    def get(self, key: Key) -> ImageRecord | None:
        """One stored image, or None."""
        ...

    def iter_records(self, batch_size: int = 1024) -> Iterator[list[ImageRecord]]:
        """Every stored image, ordered by ``(listing_id, image_id)``, in batches of at most
        ``batch_size`` (one query per batch)."""
        ...

    def iter_vectors(self, batch_size: int = 65536) -> Iterator[tuple[list[Key], np.ndarray]]:
        """Every stored row as ``(keys, (m, d) float32)`` batches of at most ``batch_size``,
        ordered by ``(listing_id, image_id)``, one query a batch (not one snapshot: read
        :meth:`seq` before and apply ``changes_since`` of it after)."""
        ...

    def seq(self) -> int:
        """The newest change-sequence number (the ``seq`` ``changes_since`` reports)."""
        ...

    def find_image(self, image_id: str) -> list[Key]:
        """Keys of every row whose ``image_id`` equals ``image_id``."""
        ...

    def all_sha256(self) -> dict[Key, str]:
        """SHA-256 of every stored image."""
        ...

    def all_sources(self) -> dict[Key, str | None]:
        """The recorded source (path, URL) of every stored image."""
        ...

    def count(self) -> int:
        """Number of rows in ``features``."""
        ...

    def count_listings(self) -> int:
        """Number of distinct ``listing_id`` in ``features`` (listings with an image)."""
        ...

    def upsert_listing(self, listing_id: str, attrs: dict[str, Any]) -> None:
        """Merge ``attrs`` into a listing (a value of None removes that attribute)."""
        ...

    def upsert_listings(self, updates: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Merge each ``(listing_id, attrs)`` into its listing in order, one transaction."""
        ...

    def listings_since(self, seq: int) -> tuple[int, list[ListingRecord]]:
        """Listings whose attributes changed after ``seq``, and the new high-water mark."""
        ...

    def get_listing(self, listing_id: str) -> ListingRecord | None:
        """One listing, or None."""
        ...

    def save_analysis(self, keys: Sequence[Key], columns: dict[str, Sequence[Any]]) -> None:
        """Set per-image analysis columns (cluster, cluster_distance, outlier_score, x, y)."""
        ...

    def analysis(self) -> dict[Key, dict[str, Any]]:
        """Stored per-image analysis of every image that still exists."""
        ...

    def save_results(self, query_id: str, hits: Sequence[tuple[str, str, float]]) -> None:
        """Write ``(listing_id, image_id, score)`` hits, best first, under ``query_id``."""
        ...

    def get_results(self, query_id: str) -> list[SavedHit]:
        """Hits saved under ``query_id``, best first."""
        ...

    def all_results(self) -> list[SavedHit]:
        """Every saved query result, by query and rank."""
        ...

    def delete_results(
        self,
        *,
        query_id: str | None = None,
        before: float | None = None,
        limit: int | None = None,
    ) -> int:
        """Delete the results saved under ``query_id``, or those of every query saved before
        ``before`` (Unix seconds; oldest first, at most ``limit`` queries); one transaction.
        Returns the number of queries deleted (:mod:`lookalike.store.results`)."""
        ...

    # watchlists and matches (lookalike.store.watch)

    def watch_seq(self) -> int:
        """The watch sequence: bumped by every change of a watchlist."""
        ...

    def watch_entries(self, name: str | None = None) -> list[WatchEntry]:
        """Every watchlist entry (or those of ``name``), by name and entry id."""
        ...

    def add_watch_entries(self, entries: Sequence[WatchEntry]) -> int:
        """Insert or replace watchlist entries (one transaction); returns how many."""
        ...

    def remove_watch(self, name: str, entry_id: str | None = None) -> int:
        """Remove a watchlist or one entry; returns the entries removed."""
        ...

    def record_matches(self, matches: Sequence[MatchRecord]) -> int:
        """Record matches (idempotent by event and target); returns how many were new."""
        ...

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
        """Recorded matches after ``after_seq`` (or after the row ``(after_seq, after_id)``),
        oldest first (see :mod:`.watch`)."""
        ...

    def mark_published(self, ids: Sequence[int], when: float | None = None) -> None:
        """Take matches out of the outbox (``published_at`` set)."""
        ...

    # the reindex generation (lookalike.store.reindex)

    def reindex_lock(self) -> AbstractContextManager[None]:
        """Hold the lock of a running reindex (one per catalog; released if the process dies).
        Raises ``LookalikeError`` when another reindex holds it."""
        ...

    def reindex_begin(self, target: ModelInfo) -> ReindexProgress:
        """Start a reindex to ``target``, or continue the one in progress to the same."""
        ...

    def reindex_progress(self) -> ReindexProgress | None:
        """The reindex in progress, or None."""
        ...

    def reindex_todo(
        self,
        *,
        after: Key | None = None,
        since_seq: int = 0,
        retry_failed: bool = True,
        limit: int = 256,
    ) -> list[ReindexItem]:
        """Live rows still to re-extract (by key after ``after``, written after
        ``since_seq``), at most ``limit``."""
        ...

    def reindex_write(self, rows: Sequence[ReindexRow]) -> int:
        """Write re-extracted rows beside the live ones (one transaction)."""
        ...

    def reindex_swap(
        self, target: ModelInfo, drop_missing: bool = False, drop_settings: Sequence[str] = ()
    ) -> SwapOutcome:
        """Switch to ``target`` in one transaction when every live row is re-extracted."""
        ...

    def reindex_abort(self) -> bool:
        """Discard the reindex in progress; False when there is none."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


def open_store(location: str | os.PathLike[str], create: bool = True) -> Store:
    """Open the store at ``location``: a catalog folder (SQLite ``catalog.db`` inside), or a
    ``postgresql://`` URL (the schema is created or migrated on first use).

    Args:
        location: catalog folder path, or PostgreSQL URL.
        create: create the folder and schema if missing (folders only).

    Raises:
        NotFoundError: the catalog folder does not exist and ``create`` is False.
        LookalikeError: an unsupported URL, or the database cannot be reached.
    """
    from ..errors import LookalikeError

    text = os.fspath(location)
    if text.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStore

        return PostgresStore(text)
    if "://" in text:
        raise LookalikeError(
            f"{text}: unsupported catalog URL; use a folder (SQLite) or postgresql://..."
        )
    from .sqlite import SqliteStore

    return SqliteStore(text, create=create)


__all__ = [
    "ReindexItem",
    "ReindexProgress",
    "ReindexRow",
    "Store",
    "SwapOutcome",
    "open_store",
]
