"""The vector cache in files beside the catalog, memory-mapped by the next process.

A new process would otherwise read every float32 row back from the store (2 GB from SQLite
for 1M x 512, tens of seconds) before its first answer. :class:`EngineFiles` keeps the cache's
rows in a folder (``<catalog>/engine``), and a new process maps them instead:

``header.json``
    the commit point, replaced atomically: format, model, the store change sequence the files
    reflect (``seq``), rows, listings, the generation folder, and a BLAKE2b digest of every
    file but the vectors;
``g-<id>/vectors.f32``
    ``(capacity, d) float32`` rows in cache order (clustered by listing), the first ``n_rows``
    valid; the rest is sparse spare room;
``g-<id>/row_listing.i32``, ``hashes.i64``, ``alive.u8``
    per row: listing number, key hash, live flag;
``g-<id>/image_ids.txt``, ``listing_ids.txt``
    the image id of each row and the listing id of each listing number, NUL-separated UTF-8
    (no id holds a NUL: no store can keep one);
``g-<id>/vectors.b2``
    a BLAKE2b digest of every :data:`CHUNK_ROWS` rows of vectors (the last chunk partial).

**Never trusted blindly**: the store stays the system of record. A header that does not parse,
names another model or format, or whose digest, sizes or counts do not match the files makes
the caller rebuild from the store; the caller then applies the store's changes since ``seq``
and checks the live count and a sample of rows against the store (``catalog/engines.py``),
and checks every vector against the chunk digests in the background
(:meth:`EngineFiles.verify_vectors`, about a second per GB), dropping the files on a mismatch.

**Building**: :meth:`EngineFiles.build` writes a generation straight from a store's rows, one
batch at a time (digests computed on the way), so a first load never holds every row in RAM.

**Updates**: a process maps the vectors copy-on-write (``MAP_PRIVATE | MAP_NORESERVE``,
:func:`lookalike.files.map_private`: a file larger than RAM + swap maps): rows it appends go
to its own pages, never into the shared file. :meth:`EngineFiles.save` (under an exclusive
``flock``) appends the rows added since the files were written, when the files are still
the ones this process read and its rows have not been renumbered; otherwise it writes a new
generation folder and switches the header to it, so a reader sees the old files or the new
ones, never a mix (old folders are removed; processes that mapped them keep their inodes).
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_path, atomic_write, map_private
from ..types import Key
from .cache import VectorCache, key_hash

log = logging.getLogger(__name__)

#: Version of the file layout; another value makes the files stale.
FORMAT = 1
HEADER = "header.json"
#: Spare rows reserved (sparse) past the rows written: a quarter more, at least this many.
MIN_SPARE_ROWS = 4096
#: Rows per vector digest.
CHUNK_ROWS = 65536
_SMALL = (
    ("row_listing.i32", np.int32),
    ("hashes.i64", np.int64),
    ("alive.u8", np.uint8),
)


@dataclass
class FileState:
    """What a process knows of the files it read or wrote last.

    Attributes:
        generation: the generation folder's name.
        n_rows: rows the files held then (this process's first ``n_rows`` rows equal them).
        n_listings: listing ids the files held then.
        layout: the cache's ``layout`` then (a compaction renumbers rows: a new generation).
        sums: the vector chunk digests (``vectors.b2``) then.
    """

    generation: str
    n_rows: int
    n_listings: int
    layout: int
    sums: bytes


class _UnwritableError(ValueError):
    """Rows the engine files cannot hold (:meth:`EngineFiles.build`)."""


class EngineFiles:
    """The engine files of one catalog (module docstring).

    Args:
        folder: ``<catalog>/engine``.
        model: the collection's model as ``{"name", "version", "dim"}`` (files of another model
            are stale).
    """

    def __init__(self, folder: Path, model: dict[str, Any]) -> None:
        self.folder = folder
        self.model = model
        self.state: FileState | None = None

    # ------------------------------------------------------------------ reading

    def header(self) -> dict[str, Any] | None:
        """The parsed header, or None when missing or unreadable."""
        try:
            data = json.loads((self.folder / HEADER).read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def load(self) -> VectorCache | None:
        """A live cache over the files (vectors memory-mapped), or None when they are missing,
        stale (format, model) or corrupt (sizes, digest, counts); the reason is logged.

        The caller still checks them against the store (module docstring).
        """
        head = self.header()
        if head is None:
            return None
        try:
            cache = self._load(head)
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            log.warning("engine files in %s not used: %s", self.folder, exc)
            return None
        return cache

    def _load(self, head: dict[str, Any]) -> VectorCache:
        if head.get("format") != FORMAT or head.get("model") != self.model:
            raise ValueError(f"format {head.get('format')} / model {head.get('model')} differ")
        gen = str(head["generation"])
        n, n_listings, dim = int(head["n_rows"]), int(head["n_listings"]), int(self.model["dim"])
        folder = self.folder / gen
        small = {}
        digest = hashlib.blake2b(digest_size=16)
        for name, dtype in _SMALL:
            arr = np.fromfile(folder / name, dtype=dtype, count=n)
            if len(arr) != n:
                raise ValueError(f"{name} holds {len(arr)} rows, the header says {n}")
            digest.update(arr.tobytes())
            small[name] = arr
        texts = {}
        chunks = -(-n // CHUNK_ROWS)
        with open(folder / "vectors.b2", "rb") as fh:
            sums = fh.read(16 * chunks)
        if len(sums) != 16 * chunks:
            raise ValueError("vectors.b2 is shorter than the header says")
        digest.update(sums)
        for name in ("image_ids.txt", "listing_ids.txt"):
            size = int(head[f"{name}_bytes"])
            with open(folder / name, "rb") as fh:
                blob = fh.read(size)
            if len(blob) != size:
                raise ValueError(f"{name} is shorter than the header says")
            digest.update(blob)
            texts[name] = blob
        if digest.hexdigest() != head["digest"]:
            raise ValueError("digest mismatch")
        blob = texts["listing_ids.txt"]
        listing_ids = blob.decode("utf-8").split("\x00") if blob else []
        row_listing = small["row_listing.i32"]
        if len(listing_ids) != n_listings:
            raise ValueError("listing id count differs from the header")
        if n and (int(row_listing.min()) < 0 or int(row_listing.max()) >= n_listings):
            raise ValueError("listing numbers out of range")
        path = folder / "vectors.f32"
        capacity = path.stat().st_size // (4 * dim)
        if capacity < max(n, 1):
            raise ValueError(f"vectors.f32 holds {capacity} rows, the header says {n}")
        vectors = map_private(path, np.float32, (capacity, dim))
        cache = VectorCache.from_arrays(
            vectors,
            n,
            row_listing,
            small["alive.u8"].view(np.bool_),
            small["hashes.i64"],
            texts["image_ids.txt"],
            listing_ids,
            int(head["seq"]),
        )
        self.state = FileState(gen, n, n_listings, cache.layout, sums)
        return cache

    @staticmethod
    def chunk_digests(vectors: np.ndarray, start: int, stop: int) -> bytes:
        """BLAKE2b-128 of rows ``[start, stop)`` in :data:`CHUNK_ROWS` chunks (``start`` a
        multiple of it), concatenated."""
        out = bytearray()
        for a in range(start, stop, CHUNK_ROWS):
            chunk = np.ascontiguousarray(vectors[a : min(stop, a + CHUNK_ROWS)])  # no copy
            out += hashlib.blake2b(chunk.data.cast("B"), digest_size=16).digest()
        return bytes(out)

    def verify_vectors(self, vectors: np.ndarray) -> bool:
        """Whether the first ``n_rows`` rows of ``vectors`` (read from the files) match the
        chunk digests read with them (reads them all: run it in the background)."""
        state = self.state
        if state is None:
            return True
        return self.chunk_digests(vectors, 0, state.n_rows) == state.sums

    # ------------------------------------------------------------------ codes

    def load_codes(self, kind: str) -> tuple[dict[str, Any], np.ndarray] | None:
        """The saved code table of ``kind`` for the files this process read (``g-<id>/
        codes-<kind>.json`` and ``.bin``: :meth:`save_codes`), or None when there is none, it
        belongs to another generation, or its sizes disagree. The codes are memory-mapped
        copy-on-write: ``(nbytes,) uint8``. Their digest is not checked here: call
        :meth:`verify_codes` in the background.
        """
        state = self.state
        if state is None:
            return None
        folder = self.folder / state.generation
        try:
            meta = json.loads((folder / f"codes-{kind}.json").read_text(encoding="utf-8"))
            if meta.get("generation") != state.generation or meta.get("kind") != kind:
                return None
            if int(meta["n_encoded"]) > state.n_rows or meta.get("model") != self.model:
                return None
            size = int(meta["bytes"])
            path = folder / f"codes-{kind}.bin"
            if path.stat().st_size != size or size == 0:
                return None
            packed = map_private(path, np.uint8, (size,))
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            log.info("saved codes in %s not used: %s", folder, exc)
            return None
        return meta, packed

    @staticmethod
    def verify_codes(meta: dict[str, Any], packed: np.ndarray) -> bool:
        """Whether ``packed`` matches the BLAKE2b digest saved with it (reads it all)."""
        return hashlib.blake2b(packed.data.cast("B"), digest_size=16).hexdigest() == meta.get(
            "digest"
        )

    def save_codes(self, meta: dict[str, Any], packed: np.ndarray) -> bool:
        """Save a code table's state (``CodeTable.state``) beside the files this process read
        or wrote, when they are still the current generation and hold every row the codes
        cover; written to temporary names and renamed, the JSON last (the commit point).

        Returns:
            Whether they were saved.

        Raises:
            OSError: the folder cannot be written.
        """
        state = self.state
        if state is None or int(meta["n_encoded"]) > state.n_rows:
            return False
        with self._locked():
            head = self.header()
            if head is None or head.get("generation") != state.generation:
                return False
            folder = self.folder / state.generation
            kind = str(meta["kind"])
            data = np.ascontiguousarray(packed)
            full = {
                **meta,
                "generation": state.generation,
                "model": self.model,
                "bytes": int(data.nbytes),
                "digest": hashlib.blake2b(data.data.cast("B"), digest_size=16).hexdigest(),
            }
            (folder / f"codes-{kind}.json").unlink(missing_ok=True)  # no stale commit point
            with atomic_path(folder / f"codes-{kind}.bin") as tmp, open(tmp, "wb") as fh:
                fh.write(data.data.cast("B"))
                fh.flush()
                os.fsync(fh.fileno())
            atomic_write(folder / f"codes-{kind}.json", json.dumps(full))
        return True

    def discard(self) -> None:
        """Remove the header (the files are then rebuilt from the store by the next load)."""
        with self._locked():
            head = self.header()
            if head is not None and self.state and head.get("generation") == self.state.generation:
                (self.folder / HEADER).unlink(missing_ok=True)
        self.state = None

    # ------------------------------------------------------------------ writing

    def exclusive(self) -> AbstractContextManager[None]:
        """Hold the files' exclusive lock (``flock`` on ``<folder>/lock``; not re-entrant:
        :meth:`save`, :meth:`save_codes` and :meth:`discard` take it themselves)."""
        return self._locked()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "lock", "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def save(self, cache: VectorCache) -> bool:
        """Bring the files up to the live ``cache`` (its ``seq``): append what is new when the
        files are still the ones this process read or wrote, else write a new generation.

        Returns:
            False when the cache cannot be written (an id with a NUL or a lone surrogate):
            the files are left as they were.

        Raises:
            OSError: the folder cannot be written.
        """
        ids = cache.listings.ids
        images = _join_ids([k[1] for k in itertools.islice(cache.keys, cache.n_rows)])
        listings = _join_ids(ids)
        if images is None or listings is None:
            return False
        with self._locked():
            head, state = self.header(), self.state
            if (
                head is not None
                and state is not None
                and head.get("generation") == state.generation
                and int(head.get("n_rows", -1)) == state.n_rows <= cache.n_rows
                and int(head.get("n_listings", -1)) == state.n_listings <= len(ids)
                and state.layout == cache.layout
                and head.get("model") == self.model
            ):
                self._append(cache, state, images, listings)
            else:
                self._write_generation(cache, images, listings)
        return True

    def build(self, seq: int, batches: Iterable[tuple[Sequence[Key], np.ndarray]]) -> bool:
        """Write a new generation straight from a store's rows, holding one batch in memory at
        a time (a 10M x 512 collection is 20 GB of float32: more than this machine's RAM),
        then switch the header to it; :meth:`load` maps it next. Call it inside
        :meth:`exclusive` (a process that waited there maps what the first one built).

        Args:
            seq: the store's change sequence read *before* the rows (the caller applies
                ``changes_since(seq)`` after mapping: a row written meanwhile is then right
                whether or not the batches saw it).
            batches: ``(keys, (m, d) float32)`` ordered by ``(listing_id, image_id)``
                (``Store.iter_vectors``).

        Returns:
            False when a batch cannot be written (an id with a NUL or a lone surrogate, rows
            out of key order, another dimension): the header is left as it was.

        Raises:
            OSError: the folder cannot be written.
        """
        dim = int(self.model["dim"])
        gen = f"g-{uuid.uuid4().hex[:12]}"
        folder = self.folder / gen
        folder.mkdir(parents=True)
        try:
            texts, arrays = self._stream_rows(folder / "vectors.f32", dim, batches)
            row_listing, hashes = arrays
            n = len(row_listing)
            small = self._small(row_listing, hashes, np.ones(n, dtype=bool), texts)
            _write_synced(folder, small)
        except _UnwritableError as exc:
            log.warning("engine files in %s not built: %s", self.folder, exc)
            shutil.rmtree(folder, ignore_errors=True)
            return False
        except BaseException:  # a full disk, a store error, an interrupt: no half generation
            shutil.rmtree(folder, ignore_errors=True)
            raise
        n_listings = int(row_listing[-1]) + 1 if n else 0
        self._commit_head(
            gen,
            small,
            seq=seq,
            n_rows=n,
            n_alive=n,
            n_listings=n_listings,
            listings_with_rows=n_listings,
        )
        self._drop_generations_but(gen)
        self.state = None  # the next load reads the new generation
        return True

    @staticmethod
    def _stream_rows(
        path: Path, dim: int, batches: Iterable[tuple[Sequence[Key], np.ndarray]]
    ) -> tuple[dict[str, bytes], tuple[np.ndarray, np.ndarray]]:
        """Write the batches' vectors to ``path`` (with sparse spare rows); the text files,
        the chunk digests, and ``(row_listing int32, hashes int64)``.

        Raises:
            _UnwritableError: an id or a batch the files cannot hold.
        """
        listing_ids: list[str] = []
        numbers: list[np.ndarray] = []
        hashes: list[np.ndarray] = []
        images = bytearray()
        sums = bytearray()
        chunk, in_chunk, n = hashlib.blake2b(digest_size=16), 0, 0
        last: Key | None = None
        with open(path, "wb") as fh:
            for keys, vectors in batches:
                m = len(keys)
                if not m:
                    continue
                v = np.ascontiguousarray(vectors, dtype=np.float32)
                if v.shape != (m, dim):
                    raise _UnwritableError(f"a batch of shape {v.shape}, d = {dim} expected")
                if last is not None and keys[0] <= last:
                    raise _UnwritableError("rows out of (listing_id, image_id) order")
                last = keys[-1]
                nums = np.empty(m, dtype=np.int32)
                for i, (lid, _) in enumerate(keys):
                    if not listing_ids or listing_ids[-1] != lid:
                        listing_ids.append(lid)
                    nums[i] = len(listing_ids) - 1
                numbers.append(nums)
                hashes.append(np.fromiter((key_hash(k) for k in keys), np.int64, count=m))
                text = _join_ids([k[1] for k in keys])
                if text is None:
                    raise _UnwritableError("an image id with a NUL or not valid UTF-8")
                images += (b"\x00" if n else b"") + text
                fh.write(v.data.cast("B"))
                i = 0
                while i < m:  # the digests of CHUNK_ROWS-row chunks, as chunk_digests
                    take = min(CHUNK_ROWS - in_chunk, m - i)
                    chunk.update(v[i : i + take].data.cast("B"))
                    in_chunk, i = in_chunk + take, i + take
                    if in_chunk == CHUNK_ROWS:
                        sums += chunk.digest()
                        chunk, in_chunk = hashlib.blake2b(digest_size=16), 0
                n += m
            if in_chunk:
                sums += chunk.digest()
            fh.truncate((n + max(MIN_SPARE_ROWS, n // 4)) * 4 * dim)  # sparse spare rows
            fh.flush()
            os.fsync(fh.fileno())
        listings = _join_ids(listing_ids)
        if listings is None:
            raise _UnwritableError("a listing id with a NUL or not valid UTF-8")
        texts = {
            "vectors.b2": bytes(sums),
            "image_ids.txt": bytes(images),
            "listing_ids.txt": listings,
        }
        row_listing = np.concatenate(numbers) if numbers else np.zeros(0, np.int32)
        key_hashes = np.concatenate(hashes) if hashes else np.zeros(0, np.int64)
        return texts, (row_listing, key_hashes)

    def _write_generation(self, cache: VectorCache, images: bytes, listings: bytes) -> None:
        gen = f"g-{uuid.uuid4().hex[:12]}"
        folder = self.folder / gen
        folder.mkdir(parents=True)
        n = cache.n_rows
        capacity = n + max(MIN_SPARE_ROWS, n // 4)
        with open(folder / "vectors.f32", "wb") as fh:
            for a in range(0, n, 65536):
                fh.write(np.ascontiguousarray(cache.vectors[a : a + 65536]).tobytes())
            fh.truncate(capacity * 4 * cache.dim)  # sparse spare rows
            fh.flush()
            os.fsync(fh.fileno())
        sums = self.chunk_digests(cache.vectors, 0, n)
        _write_synced(folder, self._small_of(cache, images, listings, sums))
        self._commit(cache, gen, images, listings, sums)
        self._drop_generations_but(gen)

    def _drop_generations_but(self, gen: str) -> None:
        """Remove every generation folder but ``gen`` (processes that mapped one keep its
        inodes)."""
        for old in self.folder.glob("g-*"):
            if old.name != gen:
                shutil.rmtree(old, ignore_errors=True)

    def _append(self, cache: VectorCache, state: FileState, images: bytes, listings: bytes) -> None:
        folder = self.folder / state.generation
        n0, n = state.n_rows, cache.n_rows
        with open(folder / "vectors.f32", "r+b") as fh:
            need = n * 4 * cache.dim
            if os.fstat(fh.fileno()).st_size < need:
                fh.truncate(need + max(MIN_SPARE_ROWS, n // 4) * 4 * cache.dim)
            fh.seek(n0 * 4 * cache.dim)
            for a in range(n0, n, 65536):
                fh.write(np.ascontiguousarray(cache.vectors[a : min(n, a + 65536)]).tobytes())
            fh.flush()
            os.fsync(fh.fileno())
        kept = n0 // CHUNK_ROWS  # whole chunks already written keep their digests
        sums = state.sums[: 16 * kept] + self.chunk_digests(cache.vectors, kept * CHUNK_ROWS, n)
        for name, data in self._small_of(cache, images, listings, sums).items():
            # whole small files are rewritten (the live flags change anywhere); atomically, so
            # a reader of the old header reads consistent old contents
            atomic_write(folder / name, data)
        self._commit(cache, state.generation, images, listings, sums)

    @staticmethod
    def _small(
        row_listing: np.ndarray, hashes: np.ndarray, alive: np.ndarray, texts: dict[str, bytes]
    ) -> dict[str, bytes]:
        """The small files, in the order the header's digest covers them (``texts``:
        ``vectors.b2``, ``image_ids.txt``, ``listing_ids.txt``)."""
        return {
            "row_listing.i32": row_listing.astype(np.int32).tobytes(),
            "hashes.i64": hashes.astype(np.int64).tobytes(),
            "alive.u8": alive.astype(np.uint8).tobytes(),
            "vectors.b2": texts["vectors.b2"],
            "image_ids.txt": texts["image_ids.txt"],
            "listing_ids.txt": texts["listing_ids.txt"],
        }

    @classmethod
    def _small_of(
        cls, cache: VectorCache, images: bytes, listings: bytes, sums: bytes
    ) -> dict[str, bytes]:
        """:meth:`_small` of a cache."""
        texts = {"vectors.b2": sums, "image_ids.txt": images, "listing_ids.txt": listings}
        return cls._small(cache.row_listing, cache.hashes, cache.alive, texts)

    def _commit(
        self, cache: VectorCache, gen: str, images: bytes, listings: bytes, sums: bytes
    ) -> None:
        rows = cache.row_listing[cache.alive]
        self._commit_head(
            gen,
            self._small_of(cache, images, listings, sums),
            seq=cache.seq,
            n_rows=cache.n_rows,
            n_alive=cache.n_alive,
            n_listings=len(cache.listings),
            listings_with_rows=int(np.unique(rows).size),
        )
        self.state = FileState(gen, cache.n_rows, len(cache.listings), cache.layout, sums)

    def _commit_head(self, gen: str, small: dict[str, bytes], **counts: int) -> None:
        """Replace the header (the commit point): ``gen``, the digest of ``small``, and
        ``counts`` (``seq``, ``n_rows``, ``n_alive``, ``n_listings``,
        ``listings_with_rows``)."""
        digest = hashlib.blake2b(digest_size=16)
        for data in small.values():
            digest.update(data)
        head = {
            "format": FORMAT,
            "model": self.model,
            "generation": gen,
            **counts,
            "image_ids.txt_bytes": len(small["image_ids.txt"]),
            "listing_ids.txt_bytes": len(small["listing_ids.txt"]),
            "digest": digest.hexdigest(),
        }
        atomic_write(self.folder / HEADER, json.dumps(head, indent=1))


def _join_ids(ids: Sequence[str]) -> bytes | None:
    """``ids`` joined by NUL, UTF-8 (the files' id lists), or None when one cannot be stored
    that way: it holds a NUL (it could not be told apart from the separator) or a lone
    surrogate."""
    try:
        data = "\x00".join(ids).encode("utf-8")
    except UnicodeEncodeError:
        return None
    return data if data.count(b"\x00") == max(len(ids) - 1, 0) else None


def _write_synced(folder: Path, files: dict[str, bytes]) -> None:
    """Write each ``name -> data`` into ``folder`` and sync it to disk."""
    for name, data in files.items():
        with open(folder / name, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
