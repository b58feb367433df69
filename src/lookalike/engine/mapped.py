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

**Updates**: a process maps the vectors copy-on-write (``MAP_PRIVATE``): rows it appends go
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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_path, atomic_write
from .cache import VectorCache

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
        vectors = np.memmap(path, dtype=np.float32, mode="c", shape=(capacity, dim))
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
            packed = np.memmap(path, dtype=np.uint8, mode="c", shape=(size,))
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
        try:
            keys = itertools.islice(cache.keys, cache.n_rows)
            images = "\x00".join(k[1] for k in keys).encode("utf-8")
            listings = "\x00".join(ids).encode("utf-8")
        except UnicodeEncodeError:
            return False
        if images.count(b"\x00") != max(cache.n_rows - 1, 0) or listings.count(b"\x00") != max(
            len(ids) - 1, 0
        ):
            return False  # an id holds a NUL: it cannot be told apart from the separator
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
        for name, data in self._small(cache, images, listings, sums).items():
            with open(folder / name, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        self._commit(cache, gen, images, listings, sums)
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
        for name, data in self._small(cache, images, listings, sums).items():
            # whole small files are rewritten (the live flags change anywhere); atomically, so
            # a reader of the old header reads consistent old contents
            atomic_write(folder / name, data)
        self._commit(cache, state.generation, images, listings, sums)

    @staticmethod
    def _small(cache: VectorCache, images: bytes, listings: bytes, sums: bytes) -> dict[str, bytes]:
        """The small files, in the order the header's digest covers them."""
        return {
            "row_listing.i32": cache.row_listing.astype(np.int32).tobytes(),
            "hashes.i64": cache.hashes.astype(np.int64).tobytes(),
            "alive.u8": cache.alive.astype(np.uint8).tobytes(),
            "vectors.b2": sums,
            "image_ids.txt": images,
            "listing_ids.txt": listings,
        }

    def _commit(
        self, cache: VectorCache, gen: str, images: bytes, listings: bytes, sums: bytes
    ) -> None:
        digest = hashlib.blake2b(digest_size=16)
        for data in self._small(cache, images, listings, sums).values():
            digest.update(data)
        head = {
            "format": FORMAT,
            "model": self.model,
            "generation": gen,
            "seq": cache.seq,
            "n_rows": cache.n_rows,
            "n_alive": cache.n_alive,
            "n_listings": len(cache.listings),
            "listings_with_rows": int(np.unique(cache.row_listing[cache.alive]).size),
            "image_ids.txt_bytes": len(images),
            "listing_ids.txt_bytes": len(listings),
            "digest": digest.hexdigest(),
        }
        atomic_write(self.folder / HEADER, json.dumps(head, indent=1))
        self.state = FileState(gen, cache.n_rows, len(cache.listings), cache.layout, sums)
