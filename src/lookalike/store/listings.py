"""Live listing attributes in the store: the ``listings`` table of ``DESIGN.md`` ("Data
model"), for SQLite (:class:`SqliteListings`) and PostgreSQL (:class:`PostgresListings`),
mixed into the two store classes.

One row per listing: ``stock_level`` and ``etag`` in columns of their own (the attributes
every filter and export reads), every other attribute in ``attrs`` (JSON text in SQLite,
``jsonb`` in PostgreSQL), and the store change-sequence number of its last change (``seq``),
which a vector cache tails (:meth:`listings_since`). An update merges into the stored
attributes (a value of None removes one); :meth:`upsert_listings` writes many in one
transaction, each with its own sequence number.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from ..types import ListingRecord

#: Attributes kept in columns of their own; the rest go to ``attrs``.
LISTING_COLUMNS = ("stock_level", "etag")
_UPSERT = (
    "INSERT INTO listings (listing_id, stock_level, etag, attrs, updated_at, seq) "
    "VALUES ({p}, {p}, {p}, {p}, {p}, {p}) ON CONFLICT (listing_id) DO UPDATE SET "
    "stock_level = excluded.stock_level, etag = excluded.etag, "
    "attrs = excluded.attrs, updated_at = excluded.updated_at, seq = excluded.seq"
)


def merged(current: dict[str, Any], attrs: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """``current`` attributes with ``attrs`` merged in (None removes one), as ``(stock_level,
    etag, the other attributes)``."""
    out = dict(current)
    for name, value in attrs.items():
        if value is None:
            out.pop(name, None)
        else:
            out[name] = value
    extra = {k: v for k, v in out.items() if k not in LISTING_COLUMNS}
    return out.get("stock_level"), out.get("etag"), extra


def row_attrs(stock_level: Any, etag: Any, extra: dict[str, Any] | None) -> dict[str, Any]:
    """Every attribute of a stored row (``stock_level``, ``etag``, the others)."""
    attrs: dict[str, Any] = dict(extra) if extra else {}
    if stock_level is not None:
        attrs["stock_level"] = int(stock_level)
    if etag is not None:
        attrs["etag"] = etag
    return attrs


class SqliteListings:
    """Listings of :class:`~lookalike.store.sqlite.SqliteStore` (a mixin: it uses the store's
    connection, lock and transactions)."""

    _conn: sqlite3.Connection
    _lock: Any

    if TYPE_CHECKING:

        def _write(self) -> AbstractContextManager[sqlite3.Cursor]: ...

        def _read(self) -> AbstractContextManager[sqlite3.Cursor]: ...

        @staticmethod
        def _next_seq(cur: sqlite3.Cursor) -> int: ...

    def upsert_listing(self, listing_id: str, attrs: dict[str, Any]) -> None:
        """Merge ``attrs`` into a listing (None removes an attribute); one transaction."""
        self.upsert_listings([(listing_id, attrs)])

    def upsert_listings(self, updates: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Merge each ``(listing_id, attrs)`` into its listing in order (None removes an
        attribute), all in one transaction, one change-sequence number each."""
        with self._write() as cur:
            for listing_id, attrs in updates:
                seq = self._next_seq(cur)
                row = cur.execute(
                    "SELECT stock_level, etag, attrs FROM listings WHERE listing_id = ?",
                    (listing_id,),
                ).fetchone()
                stock, etag, extra = merged(self._attrs(row) if row else {}, attrs)
                cur.execute(
                    _UPSERT.format(p="?"),
                    (
                        listing_id,
                        stock,
                        etag,
                        json.dumps(extra) if extra else None,
                        time.time(),
                        seq,
                    ),
                )

    @staticmethod
    def _attrs(row: Sequence[Any]) -> dict[str, Any]:
        return row_attrs(row[0], row[1], json.loads(row[2]) if row[2] else None)

    def listings_since(self, seq: int) -> tuple[int, list[ListingRecord]]:
        """Listings whose attributes changed after ``seq``, and the new high-water mark."""
        with self._read() as cur:
            high = int(cur.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0])
            rows = cur.execute(
                "SELECT listing_id, stock_level, etag, attrs FROM listings WHERE seq > ?", (seq,)
            ).fetchall()
        return high, [ListingRecord(r[0], self._attrs(r[1:])) for r in rows]

    def get_listing(self, listing_id: str) -> ListingRecord | None:
        """One listing, or None."""
        with self._lock:
            r = self._conn.execute(
                "SELECT listing_id, stock_level, etag, attrs FROM listings WHERE listing_id = ?",
                (listing_id,),
            ).fetchone()
        return ListingRecord(r[0], self._attrs(r[1:])) if r else None


class PostgresListings:
    """Listings of :class:`~lookalike.store.postgres.PostgresStore` (a mixin: it uses the
    store's transactions)."""

    if TYPE_CHECKING:

        def _tx(self, read_only: bool = False) -> AbstractContextManager[Any]: ...

        @staticmethod
        def _next_seq(cur: Any) -> int: ...

    def upsert_listing(self, listing_id: str, attrs: dict[str, Any]) -> None:
        """Merge ``attrs`` into a listing (None removes an attribute); one transaction."""
        self.upsert_listings([(listing_id, attrs)])

    def upsert_listings(self, updates: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Merge each ``(listing_id, attrs)`` into its listing in order (None removes an
        attribute), all in one transaction, one change-sequence number each (the row locked
        while it is merged)."""
        from psycopg.types.json import Jsonb

        with self._tx() as cur:
            for listing_id, attrs in updates:
                seq = self._next_seq(cur)
                cur.execute(
                    "SELECT stock_level, etag, attrs FROM listings "
                    "WHERE listing_id = %s FOR UPDATE",
                    (listing_id,),
                )
                row = cur.fetchone()
                stock, etag, extra = merged(self._attrs(row) if row else {}, attrs)
                cur.execute(
                    _UPSERT.format(p="%s"),
                    (listing_id, stock, etag, Jsonb(extra) if extra else None, time.time(), seq),
                )

    @staticmethod
    def _attrs(row: Sequence[Any]) -> dict[str, Any]:
        return row_attrs(row[0], row[1], row[2])

    def listings_since(self, seq: int) -> tuple[int, list[ListingRecord]]:
        """Listings whose attributes changed after ``seq``, and the new high-water mark."""
        with self._tx(read_only=True) as cur:
            cur.execute("SELECT value FROM counters WHERE name = 'seq'")
            high = int(cur.fetchone()[0])
            cur.execute(
                "SELECT listing_id, stock_level, etag, attrs FROM listings WHERE seq > %s", (seq,)
            )
            rows = cur.fetchall()
        return high, [ListingRecord(r[0], self._attrs(r[1:])) for r in rows]

    def get_listing(self, listing_id: str) -> ListingRecord | None:
        """One listing, or None."""
        with self._tx(read_only=True) as cur:
            cur.execute(
                "SELECT listing_id, stock_level, etag, attrs FROM listings WHERE listing_id = %s",
                (listing_id,),
            )
            r = cur.fetchone()
        return ListingRecord(r[0], self._attrs(r[1:])) if r else None
