"""The engine's in-RAM copy of a collection: vectors, keys, listing numbers, listing attributes.

This module owns :class:`VectorCache` (rows, synced from a store's change sequence) and
:class:`ListingTable` (listing ids, their dense numbers and live attributes), and the stable
row id :func:`key_hash`.

Rows are kept clustered by ``listing_id`` (the seed's "partition on the group key"): the first
load comes from the store ordered by ``(listing_id, image_id)``; later writes are appended and
the cache is re-clustered when it compacts. Listings are numbered with dense integers (a
*listing number* is a position in :class:`ListingTable`), so that grouping and filtering work on
integer arrays: :attr:`VectorCache.row_listing` holds the listing number of each row. (The
word *codes* is kept for the quantized vectors of ``codes.py``.)
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from ..types import Changes, Key, ListingRecord
from .columns import AttributeColumn, ColumnReader, ListingIdColumn
from .filters import Expr, parse_where

#: Compact (drop dead rows and re-cluster) once this fraction of the rows is dead.
COMPACT_DEAD_FRACTION = 0.25
#: ``where`` masks kept per listing table (distinct expressions at the current version).
MASK_CACHE_SIZE = 64


def key_hash(key: tuple[str, str]) -> int:
    """A stable 63-bit id of ``(listing_id, image_id)``: BLAKE2b-64 of
    ``len(listing_id):listing_id image_id`` (length-prefixed, so no two keys share a string),
    top bit cleared (faiss ids are non-negative int64). The same in every process, so an index
    saved with the catalog stays valid."""
    text = f"{len(key[0])}:{key[0]}{key[1]}"
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


class ListingTable:
    """Listing ids <-> dense listing numbers, and each listing's live attributes as typed
    columns (:mod:`lookalike.engine.columns`).

    Numbers are assigned on first sight (from a feature row or a listing record) and never
    reused: ``ids[number]`` is the listing id. ``where`` masks are cached per expression and
    :attr:`version` (:meth:`where_mask`).

    :meth:`snapshot` gives an immutable copy in O(1): the id list and the text dictionaries
    only grow, and a column the snapshot shares is copied before this table changes it
    (copy-on-write).

    Attributes:
        version: bumped on every change of the attributes or the listings.
        frozen: True for a snapshot (it refuses changes).
    """

    def __init__(self) -> None:
        self._ids: list[str] = []
        self.number_of: dict[str, int] = {}
        self._columns: dict[str, AttributeColumn] = {}
        self._shared: set[str] = set()  # columns a snapshot holds: copy before writing
        self.version = 0
        self.frozen = False
        self._n: int | None = None  # a snapshot's length (its first _n ids)
        self._masks: dict[tuple[str, int], npt.NDArray[np.bool_]] = {}

    def __len__(self) -> int:
        return len(self._ids) if self._n is None else self._n

    @property
    def ids(self) -> list[str]:
        """Listing ids by listing number (a snapshot returns a copy of its prefix)."""
        return self._ids if self._n is None else self._ids[: self._n]

    def snapshot(self) -> ListingTable:
        """An immutable copy of the table as it is now (O(1): copy-on-write, class docstring)."""
        snap = copy.copy(self)
        snap.__dict__.update(_n=len(self), frozen=True, _columns=dict(self._columns), _shared=set())
        self._shared = set(self._columns)
        return snap

    def _check_unfrozen(self) -> None:
        if self.frozen:
            raise ValueError("a listing table snapshot cannot change")

    def number(self, listing_id: str) -> int:
        """The listing number of ``listing_id``, assigning the next one if it is new.

        Raises:
            ValueError: the table is a snapshot and the listing is new to it.
        """
        c = self.number_of.get(listing_id)
        if c is not None and c < len(self):
            return c
        self._check_unfrozen()
        c = len(self._ids)
        self.number_of[listing_id] = c
        self._ids.append(listing_id)
        self.version += 1
        return c

    def numbers(self, listing_ids: Sequence[str]) -> npt.NDArray[np.int32]:
        """``(n,) int32`` listing numbers of ``listing_ids`` (new ones assigned)."""
        n = len(listing_ids)
        return np.fromiter((self.number(x) for x in listing_ids), dtype=np.int32, count=n)

    def update(self, records: Sequence[ListingRecord]) -> None:
        """Replace the attributes of the listings in ``records`` (an attribute a record does not
        name is removed from its listing); a listing named twice keeps its last record."""
        if not records:
            return
        self._check_unfrozen()
        last = {rec.listing_id: rec.attrs for rec in records}
        numbers = np.fromiter((self.number(x) for x in last), dtype=np.int64, count=len(last))
        attrs = list(last.values())
        names = set(self._columns).union(*attrs)
        for name in names:
            col = self._columns.get(name)
            if col is None:
                col = self._columns[name] = AttributeColumn()
            elif name in self._shared:  # a snapshot reads this one: write to a copy
                col = self._columns[name] = col.copy()
                self._shared.discard(name)
            held = np.fromiter((name in a for a in attrs), dtype=bool, count=len(attrs))
            col.set_many(numbers, [a.get(name) for a in attrs], held)
        self.version += 1

    def names(self) -> set[str]:
        """Attribute names some listing has (``listing_id`` included)."""
        return {"listing_id"} | {name for name, col in self._columns.items() if col.holders}

    def attribute(self, name: str) -> ColumnReader:
        """The column of attribute ``name`` (``listing_id`` included; an attribute no listing
        has reads as missing everywhere)."""
        if name == "listing_id":
            return ListingIdColumn(self._ids, self.number_of)  # reads the first len(self)
        return self._columns.get(name) or AttributeColumn()

    def where_mask(self, where: str, expr: Expr | None = None) -> npt.NDArray[np.bool_]:
        """``(len(self),) bool``: the listings that pass ``where``, cached per (expression text,
        :attr:`version`) for the next query (treat the array as read-only).

        Args:
            where: the expression text (the cache key).
            expr: ``parse_where(where)``, if the caller parsed it already.

        Raises:
            QueryError: a malformed expression (:func:`~lookalike.engine.filters.parse_where`).
        """
        key = (where, self.version)
        mask = self._masks.get(key)
        if mask is None:
            mask = (expr or parse_where(where)).mask(self)
            mask.flags.writeable = False
            if len(self._masks) >= MASK_CACHE_SIZE:
                self._masks.clear()
            self._masks[key] = mask
        return mask


class VectorCache:
    """The collection's vectors in RAM, synced from a store's change sequence.

    :meth:`snapshot` gives an immutable copy of the cache in O(1), which a search reads while
    this cache keeps applying changes: rows are only appended past a snapshot's rows (or the
    arrays replaced), and what a snapshot shares that changes in place (the live flags, the key
    list, the listing columns) is copied before it changes (copy-on-write).

    Attributes:
        dim: vector dimension ``d``.
        seq: last store sequence number applied (features).
        listing_seq: last store sequence number applied (listing attributes).
        listings: the :class:`ListingTable`.
        keys: ``keys[row]`` is the ``(listing_id, image_id)`` of a row (dead rows included).
        version: bumped on every change (derived structures compare it).
        layout: bumped when rows are renumbered by :meth:`compact`; row numbers are stable
            between two layout changes, new rows are appended.
        frozen: True for a snapshot (it refuses changes).
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.seq = 0
        self.listing_seq = 0
        self.listings = ListingTable()
        self._vectors = np.zeros((0, dim), dtype=np.float32)
        self._row_listing = np.zeros(0, dtype=np.int32)
        self._alive = np.zeros(0, dtype=bool)
        self._hashes = np.zeros(0, dtype=np.int64)
        self._n = 0
        self._n_alive = 0
        self.keys: list[Key] = []
        self._row_of: dict[Key, int] | None = {}
        self.version = 0  # bumped on every change, for derived caches (indexes, codes)
        self.layout = 0  # bumped when rows are renumbered (compaction)
        self.frozen = False
        self._shared_alive = False  # a snapshot holds _alive: copy before clearing a flag
        self._shared_keys = False  # a snapshot holds keys: copy before appending

    # ------------------------------------------------------------------ snapshots

    def snapshot(self) -> VectorCache:
        """An immutable copy of the cache as it is now, sharing its arrays (O(1); see the
        class docstring). Its :attr:`row_of` is built on first use."""
        snap = copy.copy(self)
        snap.__dict__.update(
            frozen=True,
            listings=self.listings.snapshot(),
            _row_of=None,
            _shared_alive=False,
            _shared_keys=False,
        )
        self._shared_alive = self._shared_keys = True
        return snap

    def adopt(self, snapshot: VectorCache) -> None:
        """Show the state of ``snapshot`` (sharing it; this cache becomes frozen too).

        An engine built over this object reads whichever snapshot was adopted last: the
        catalog adopts the newest one before each scan, so the engine and its derived
        structures (codes, indexes) follow the collection without being rebuilt.

        Raises:
            ValueError: ``snapshot`` is not frozen, or has another dimension.
        """
        if not snapshot.frozen or snapshot.dim != self.dim:
            raise ValueError("adopt takes a snapshot of a cache of the same dimension")
        self.__dict__.update(snapshot.__dict__)

    def _check_unfrozen(self) -> None:
        if self.frozen:
            raise ValueError("a vector cache snapshot cannot change")

    @property
    def row_of(self) -> dict[Key, int]:
        """key -> row of each live key (a snapshot builds it on first use: treat as
        read-only)."""
        row_of = self._row_of
        if row_of is None:
            live = np.flatnonzero(self.alive).tolist()
            keys = self.keys
            row_of = self._row_of = {keys[r]: r for r in live}
        return row_of

    # ------------------------------------------------------------------ views

    @property
    def n_rows(self) -> int:
        """Rows held, dead ones included."""
        return self._n

    @property
    def n_alive(self) -> int:
        """Rows that are live (not deleted or replaced)."""
        return self._n_alive

    @property
    def vectors(self) -> np.ndarray:
        """``(n_rows, d) float32`` view (dead rows included; see :attr:`alive`)."""
        return self._vectors[: self._n]

    @property
    def row_listing(self) -> np.ndarray:
        """``(n_rows,) int32``: the listing number of each row (a position in
        :attr:`listings`)."""
        return self._row_listing[: self._n]

    @property
    def alive(self) -> np.ndarray:
        """``(n_rows,) bool``: False for deleted or replaced rows."""
        return self._alive[: self._n]

    @property
    def hashes(self) -> np.ndarray:
        """``(n_rows,) int64`` stable id of each row's key (:func:`key_hash`)."""
        return self._hashes[: self._n]

    def nbytes(self) -> int:
        """Approximate RAM held by the cache, in bytes (arrays plus key bookkeeping)."""
        arrays = (
            self._vectors.nbytes
            + self._row_listing.nbytes
            + self._alive.nbytes
            + self._hashes.nbytes
        )
        per_key = 200  # tuple of two short str + dict slot, measured with sys.getsizeof
        return int(arrays + per_key * len(self.keys))

    # ------------------------------------------------------------------ changes

    def apply(self, changes: Changes) -> None:
        """Apply a store's :class:`~lookalike.types.Changes` (deletes first, then upserts);
        compacts when more than :data:`COMPACT_DEAD_FRACTION` of the rows are dead.

        Raises:
            ValueError: the vectors' dimension is not :attr:`dim`; the cache is a snapshot.
        """
        self._check_unfrozen()
        if changes.vectors.shape[0] and changes.vectors.shape[1] != self.dim:
            raise ValueError(
                f"store vectors have d={changes.vectors.shape[1]}, cache expects {self.dim}"
            )
        row_of = self.row_of
        dead = [row_of.pop(key) for key in changes.deleted if key in row_of]
        dead += [row_of[key] for key in changes.upserted if key in row_of]
        if dead:
            if self._shared_alive:
                self._alive = self._alive.copy()
                self._shared_alive = False
            self._alive[dead] = False
        if changes.upserted:
            self._append(changes.upserted, changes.vectors)
        self._n_alive = len(row_of)
        self.seq = max(self.seq, changes.seq)
        if changes.upserted or changes.deleted:
            self.version += 1
            if self._n and (self._n - self.n_alive) > COMPACT_DEAD_FRACTION * self._n:
                self.compact()

    def _append(self, keys: Sequence[Key], vectors: np.ndarray) -> None:
        m = len(keys)
        need = self._n + m
        if need > self._vectors.shape[0]:
            cap = max(need, int(self._vectors.shape[0] * 1.5) + 1024) if self._n else need
            self._vectors = _grow(self._vectors, cap, self._n)
            self._row_listing = _grow(self._row_listing, cap, self._n)
            self._alive = _grow(self._alive, cap, self._n)
            self._hashes = _grow(self._hashes, cap, self._n)
            self._shared_alive = False
        start = self._n
        # past every snapshot's rows: written in place
        self._vectors[start:need] = vectors
        self._row_listing[start:need] = self.listings.numbers([k[0] for k in keys])
        self._alive[start:need] = True
        self._hashes[start:need] = np.fromiter((key_hash(k) for k in keys), np.int64, count=m)
        row_of = self.row_of
        for i, key in enumerate(keys):
            row_of[key] = start + i
        if self._shared_keys:
            self.keys = [*self.keys, *keys]
            self._shared_keys = False
        else:
            self.keys.extend(keys)
        self._n = need

    def compact(self) -> None:
        """Drop dead rows and re-cluster the live ones by ``(listing_id, image_id)``.

        Raises:
            ValueError: the cache is a snapshot.
        """
        self._check_unfrozen()
        live = sorted(self.row_of.items())
        rows = np.fromiter((r for _, r in live), dtype=np.int64, count=len(live))
        self._vectors = np.ascontiguousarray(self._vectors[rows])
        self._row_listing = self._row_listing[rows].copy()
        self._alive = np.ones(len(rows), dtype=bool)
        self._hashes = self._hashes[rows].copy()
        self.keys = [k for k, _ in live]
        self._row_of = {k: i for i, k in enumerate(self.keys)}
        self._shared_alive = self._shared_keys = False
        self._n = self._n_alive = len(rows)
        self.version += 1
        self.layout += 1

    def update_listings(self, seq: int, records: Sequence[ListingRecord]) -> None:
        """Apply changed listing attributes up to store sequence ``seq``.

        Raises:
            ValueError: the cache is a snapshot.
        """
        self._check_unfrozen()
        self.listings.update(records)
        self.listing_seq = max(self.listing_seq, seq)


def _grow(arr: np.ndarray, cap: int, n: int) -> np.ndarray:
    out = np.zeros((cap, *arr.shape[1:]), dtype=arr.dtype)
    out[:n] = arr[:n]
    return out
