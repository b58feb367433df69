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
import operator
from collections.abc import Iterator, Sequence
from typing import SupportsIndex, overload

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
        self._number_of: dict[str, int] | None = {}
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

    @classmethod
    def of_ids(cls, ids: list[str]) -> ListingTable:
        """A table of listings numbered in the order of ``ids`` (no attributes yet)."""
        table = cls()
        table.__dict__.update(_ids=ids, _number_of=None, version=1)  # the map: on first use
        return table

    @property
    def number_of(self) -> dict[str, int]:
        """Listing id -> listing number (a snapshot's may hold numbers past its length: check
        them against ``len``)."""
        number_of = self._number_of
        if number_of is None:
            number_of = self._number_of = {lid: i for i, lid in enumerate(self._ids)}
        return number_of

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
        number_of = self.number_of
        c = number_of.get(listing_id)
        if c is not None and c < len(self):
            return c
        self._check_unfrozen()
        c = len(self._ids)
        number_of[listing_id] = c
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


class KeyColumn(Sequence[Key]):
    """The keys of rows read back from files, decoded on access: row ``r`` is
    ``(listing_ids[row_listing[r]], image id r)``, the image ids NUL-separated UTF-8 in
    ``blob``. A search reads a few keys; iterating decodes them all at once.

    Args:
        listing_ids: listing ids by listing number.
        row_listing: ``(n,) int32`` listing number of each row.
        blob: the ``n`` image ids joined by NUL, UTF-8.
    """

    def __init__(self, listing_ids: list[str], row_listing: np.ndarray, blob: bytes) -> None:
        self._lids = listing_ids
        self._rows = row_listing
        self._blob = blob
        nul = np.flatnonzero(np.frombuffer(blob, dtype=np.uint8) == 0)
        self._starts = np.concatenate([[0], nul + 1]).astype(np.int64)
        self._ends = np.concatenate([nul, [len(blob)]]).astype(np.int64)
        if len(blob) == 0 and len(row_listing) == 0:
            self._starts = self._ends = np.zeros(0, dtype=np.int64)
        if len(self._starts) != len(row_listing):
            raise ValueError(f"{len(self._starts)} image ids for {len(row_listing)} rows")
        self._all: list[Key] | None = None

    def __len__(self) -> int:
        return len(self._rows)

    def _one(self, i: int) -> Key:
        text = self._blob[self._starts[i] : self._ends[i]].decode("utf-8")
        return self._lids[self._rows[i]], text

    @overload
    def __getitem__(self, i: SupportsIndex) -> Key: ...

    @overload
    def __getitem__(self, i: slice) -> list[Key]: ...

    def __getitem__(self, i: SupportsIndex | slice) -> Key | list[Key]:
        if isinstance(i, slice):
            return self.materialize()[i]
        n = len(self._rows)
        j = operator.index(i)
        j = j + n if j < 0 else j
        if not 0 <= j < n:
            raise IndexError(f"row {i} of {n}")
        return self._one(j)

    def __iter__(self) -> Iterator[Key]:
        return iter(self.materialize())

    def materialize(self) -> list[Key]:
        """Every key as a list (decoded once, then kept)."""
        if self._all is None:
            images = self._blob.decode("utf-8").split("\x00") if len(self._rows) else []
            lids = self._lids
            rows = [lids[r] for r in self._rows.tolist()]
            self._all = list(zip(rows, images, strict=True))
        return self._all


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
        model: tag (``name@version``) of the model the vectors come from, set by whoever
            fills the cache (``""``: not told); an ANN index built over it records it.
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.model = ""
        self.seq = 0
        self.listing_seq = 0
        self.listings = ListingTable()
        self._vectors = np.zeros((0, dim), dtype=np.float32)
        self._row_listing = np.zeros(0, dtype=np.int32)
        self._alive = np.zeros(0, dtype=bool)
        self._hashes = np.zeros(0, dtype=np.int64)
        self._n = 0
        self._n_alive = 0
        self.keys: list[Key] | KeyColumn = []
        self._row_of: dict[Key, int] | None = {}
        self.version = 0  # bumped on every change, for derived caches (indexes, codes)
        self.layout = 0  # bumped when rows are renumbered (compaction)
        self.frozen = False
        self._shared_alive = False  # a snapshot holds _alive: copy before clearing a flag
        self._shared_keys = False  # a snapshot holds keys: copy before appending

    @classmethod
    def from_arrays(
        cls,
        vectors: np.ndarray,
        n: int,
        row_listing: np.ndarray,
        alive: np.ndarray,
        hashes: np.ndarray,
        image_ids: bytes,
        listing_ids: list[str],
        seq: int,
    ) -> VectorCache:
        """A live cache over rows read back from files (``engine/mapped.py``).

        Args:
            vectors: ``(capacity, d) float32`` with ``capacity >= n`` (a copy-on-write memory
                map: rows appended later go into the spare rows without touching the file).
            n: rows held.
            row_listing, alive, hashes: ``(n,)`` int32, bool and int64 per row (copied into
                arrays of ``capacity``).
            image_ids: the ``n`` image ids joined by NUL (UTF-8), decoded on access
                (:class:`KeyColumn`); ``listing_ids``: the listing ids by listing number.
            seq: the store sequence number the rows reflect.

        The key -> row and listing id -> number maps are built on first use (a search never
        needs them).

        Raises:
            ValueError: the image ids are not ``n``.
        """
        cap, dim = vectors.shape
        cache = cls(dim)
        cache.seq = seq
        cache.listings = ListingTable.of_ids(listing_ids)
        cache._vectors = vectors
        for name, arr, dtype in (
            ("_row_listing", row_listing, np.int32),
            ("_alive", alive, np.bool_),
            ("_hashes", hashes, np.int64),
        ):
            full = np.zeros(cap, dtype=dtype)
            full[:n] = arr[:n]
            setattr(cache, name, full)
        cache._n = n
        cache._n_alive = int(np.count_nonzero(alive[:n]))
        cache.keys = KeyColumn(listing_ids, cache._row_listing[:n], image_ids)
        cache._row_of = None
        cache.version = 1
        return cache

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
            keys = self.keys if isinstance(self.keys, list) else list(self.keys)
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
        if not (changes.upserted or changes.deleted):
            self.seq = max(self.seq, changes.seq)
            return
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
        if self._shared_keys or not isinstance(self.keys, list):
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
