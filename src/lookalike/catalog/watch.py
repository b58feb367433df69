"""Watchlists (standing queries) in the catalog: named sets of reference vectors, each with its
threshold, that every image written to the catalog is compared with.

**The reverse search.** Every write path (``index``, ``add``/``add_many``, the stream, the
HTTP upload, ``add_vectors``/``import_batch``) hands the batch's ``(n, d) float32`` vectors to
:meth:`CatalogWatch.watch_matches` just before the store transaction: one matrix product with
the ``(m, d) float32`` reference vectors of all watchlists (the exact float32 inner product the
reference engine scores with, ``lookalike.engine.numpy_engine``), and a match wherever
``score > threshold`` of the entry. The matches are written in the **same transaction** as the
images (``Store.upsert(batch, matches)``), so an image is never stored without its matches
nor the other way round, and a replayed write records nothing twice (rows are unique by event
and entry).

**Without a restart.** The catalog keeps the reference matrix in RAM and re-reads it when the
store's watch sequence moved (read before every write batch: one tiny query), so an entry
added or removed by another process (``lookalike watch add`` while ``lookalike stream`` runs,
``POST /watchlists``) applies to the next batch.

**Events.** Matches of one arriving image and one watchlist form one event, whose id
(:func:`match_event_id`) is derived from the watchlist, the image's key and its SHA-256: the
``Nats-Msg-Id`` it is published with (``lookalike.stream``), so a replay is dropped by
JetStream's duplicate window. The ``matches`` table is the outbox: :meth:`outbox` lists what is
still to publish, :meth:`mark_published` takes it out.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ModelMismatchError, NotFoundError, QueryError
from ..extract import l2_normalize
from ..types import Key, MatchRecord, WatchEntry, WriteStatus
from .base import CatalogBase, ImageInput
from .validate import check_id

log = logging.getLogger(__name__)

#: A watchlist name: it is a token of the NATS subject ``lookalike.watch.<name>``.
WATCH_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: Most entries one watchlist may hold (the reverse search is one ``(n, d) x (d, m)`` product
#: per write batch: 10,000 entries of d = 1280 are 51 MB of float32).
MAX_WATCH_ENTRIES = 10_000


def check_watch_name(name: object) -> str:
    """``name`` when it is a valid watchlist name (:data:`WATCH_NAME`).

    Raises:
        QueryError: it is not, saying why.
    """
    if not isinstance(name, str) or not WATCH_NAME.fullmatch(name):
        shown = repr(name)[:80]
        raise QueryError(
            f"watchlist name {shown} is not 1-64 characters of A-Z, a-z, 0-9, '_' and '-' "
            "(it becomes the NATS subject lookalike.watch.<name>)"
        )
    return name


def check_threshold(threshold: object) -> float:
    """``threshold`` as a float when it is a finite cosine in [-1, 1].

    Raises:
        QueryError: it is not.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise QueryError(f"threshold must be a number, not {type(threshold).__name__}")
    value = float(threshold)
    if not math.isfinite(value) or not -1.0 <= value <= 1.0:
        raise QueryError(f"threshold {value} is not a cosine in [-1, 1]")
    return value


def match_event_id(listing_id: str, image_id: str, sha256: str, watchlist: str | None) -> str:
    """The id of the event for one arriving image (and one watchlist; None: the match-on-
    arrival event of catalog hits): 32 hex digits of the SHA-256 of the watchlist, the key
    and the image's SHA-256, prefixed ``w-`` (watchlist) or ``m-`` (catalog). The same image
    bytes under the same key always give the same id (it is the event's ``Nats-Msg-Id``)."""
    text = "\x1f".join((watchlist or "", listing_id, image_id, sha256))
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return ("w-" if watchlist is not None else "m-") + digest


def default_entry_ids(keys: Sequence[Key]) -> list[str]:
    """The entry ids stored images get in a watchlist when none is given: the image id, or
    ``listing_id/image_id`` when ``keys`` hold the same image id in several listings."""
    listings = Counter(iid for _, iid in set(keys))
    return [iid if listings[iid] == 1 else f"{lid}/{iid}" for lid, iid in keys]


@dataclass
class _WatchMatrix:
    """The watchlists in RAM: the store's watch sequence they reflect, and the entries with
    their ``(m, d) float32`` vectors and ``(m,) float32`` thresholds stacked."""

    seq: int
    entries: list[WatchEntry]
    vectors: np.ndarray
    thresholds: np.ndarray


#: Receives ``(key, status)`` of the images a catalog object wrote (``added``/``updated``).
WriteListener = Callable[[list[tuple[Key, WriteStatus]]], None]


class CatalogWatch(CatalogBase):
    """The watchlist part of :class:`~lookalike.catalog.Catalog` (see the module docstring)."""

    _watch: _WatchMatrix | None = None
    _listeners: tuple[WriteListener, ...] = ()

    # ------------------------------------------------------------------ write listeners

    def add_write_listener(self, listener: WriteListener) -> None:
        """Call ``listener`` with ``[((listing_id, image_id), status), ...]`` after each
        ``add``/``add_many`` of this catalog object that stored new images (``added`` or
        ``updated``), in the writing thread (the HTTP server's live view uses it). A listener
        must be quick and must not raise (what it raises is logged and ignored)."""
        with self._lock:
            self._listeners = (*self._listeners, listener)

    def remove_write_listener(self, listener: WriteListener) -> None:
        """Stop calling ``listener`` (no error when it was not added)."""
        with self._lock:
            self._listeners = tuple(x for x in self._listeners if x is not listener)

    def _notify_written(self, written: list[tuple[Key, WriteStatus]]) -> None:
        kept = (WriteStatus.ADDED, WriteStatus.UPDATED)
        stored: list[tuple[Key, WriteStatus]] = [(k, s) for k, s in written if s in kept]
        for listener in self._listeners if stored else ():
            try:
                listener(stored)
            except Exception:
                log.exception("a write listener failed")

    # ------------------------------------------------------------------ entries

    def watch_add(
        self,
        name: str,
        vectors: np.ndarray,
        entry_ids: Sequence[str],
        threshold: float,
        *,
        sources: Sequence[str | None] | None = None,
        refs: Sequence[Key | None] | None = None,
    ) -> list[WatchEntry]:
        """Add (or replace, by entry id) reference vectors to watchlist ``name`` (created on
        first use); from the next write batch on, every written image is compared with them.

        Args:
            name: the watchlist (:data:`WATCH_NAME`).
            vectors: ``(m, d)`` float, the catalog's model's dimension; L2-normalized here.
            entry_ids: one id per vector (the id rule of ``lookalike.types.id_problem``).
            threshold: a written image matches an entry when ``score > threshold``.
            sources: where each reference came from (shown in listings), or None.
            refs: the stored image each reference was taken from, or None.

        Returns:
            The entries written.

        Raises:
            QueryError: a bad name, id, threshold, vector (NaN, zero) or length; more than
                :data:`MAX_WATCH_ENTRIES` entries in the watchlist.
            ModelMismatchError: ``d`` is not the catalog's (an empty catalog takes the
                extractor's model).
        """
        check_watch_name(name)
        t = check_threshold(threshold)
        info = self.model or self.extractor.info
        v = np.asarray(vectors, dtype=np.float64)
        if v.ndim != 2 or v.shape[1] != info.dim:
            raise ModelMismatchError(
                f"watchlist vectors have shape {v.shape}; the catalog's model {info.tag} has "
                f"d={info.dim}"
            )
        if len(entry_ids) != len(v) or len(set(entry_ids)) != len(entry_ids):
            raise QueryError("give one distinct entry id per vector")
        for eid in entry_ids:
            check_id(eid, "entry id")
        if not np.isfinite(v).all() or (np.linalg.norm(v, axis=1) < 1e-6).any():
            raise QueryError("watchlist vectors must be finite and not zero")
        known = {e.entry_id for e in self._store.watch_entries(name)}
        if len(known | set(entry_ids)) > MAX_WATCH_ENTRIES:
            raise QueryError(f"a watchlist holds at most {MAX_WATCH_ENTRIES} entries")
        self._claim(info)
        # scaled by the largest component first (in float64), so that components near
        # float32's limit do not overflow the norm to inf
        v = l2_normalize(v / np.abs(v).max(axis=1, keepdims=True))
        entries = []
        for i, eid in enumerate(entry_ids):
            ref = refs[i] if refs else None
            entries.append(
                WatchEntry(
                    name=name,
                    entry_id=eid,
                    vector=v[i],
                    threshold=t,
                    source=sources[i] if sources else None,
                    ref_listing_id=ref[0] if ref else None,
                    ref_image_id=ref[1] if ref else None,
                )
            )
        self._store.add_watch_entries(entries)
        return self._store.watch_entries(name)

    def watch_add_images(
        self,
        name: str,
        images: Sequence[ImageInput],
        entry_ids: Sequence[str],
        threshold: float,
        sources: Sequence[str | None] | None = None,
    ) -> list[WatchEntry]:
        """Embed ``images`` (paths, URLs, bytes, PIL images) with the catalog's extractor and
        add them to watchlist ``name`` (see :meth:`watch_add`).

        Raises:
            ImageError: an image cannot be read. Otherwise as :meth:`watch_add`.
        """
        return self.watch_add(name, self.embed(images), entry_ids, threshold, sources=sources)

    def watch_add_stored(
        self,
        name: str,
        keys: Sequence[Key],
        threshold: float,
        entry_ids: Sequence[str | None] | None = None,
    ) -> list[WatchEntry]:
        """Add stored images (their vectors) to watchlist ``name`` (see :meth:`watch_add`).

        Args:
            entry_ids: per key, its entry id, or None for the default: the image id, or
                ``listing_id/image_id`` when the same image id comes from several listings.

        Raises:
            NotFoundError: a key is not stored. Otherwise as :meth:`watch_add`.
        """
        if not keys:
            raise QueryError("give at least one stored image")
        vectors = []
        for lid, iid in keys:
            rec = self._store.get((lid, iid))
            if rec is None:
                raise NotFoundError(f"no image {iid!r} in listing {lid!r}")
            vectors.append(rec.vector)
        defaults = default_entry_ids(keys)
        chosen = [
            (entry_ids[i] if entry_ids and entry_ids[i] else None) or defaults[i]
            for i in range(len(keys))
        ]
        return self.watch_add(
            name,
            np.stack(vectors),
            chosen,
            threshold,
            sources=[f"stored {iid}" for _, iid in keys],
            refs=list(keys),
        )

    def watch_entries(self, name: str | None = None) -> list[WatchEntry]:
        """The entries of watchlist ``name`` (every watchlist's when None), by name and id.

        Raises:
            NotFoundError: ``name`` has no entry.
        """
        if name is not None:
            check_watch_name(name)
        entries = self._store.watch_entries(name)
        if name is not None and not entries:
            raise NotFoundError(f"no watchlist {name!r}")
        return entries

    def watch_remove(self, name: str, entry_id: str | None = None) -> int:
        """Remove watchlist ``name`` (or one entry of it); later writes are no longer
        compared with it. Its recorded matches stay.

        Returns:
            Entries removed (at least 1).

        Raises:
            NotFoundError: no such watchlist or entry.
        """
        check_watch_name(name)
        removed = self._store.remove_watch(name, entry_id)
        if not removed:
            what = f"entry {entry_id!r} in watchlist" if entry_id is not None else "watchlist"
            raise NotFoundError(f"no {what} {name!r}")
        return removed

    # ------------------------------------------------------------------ matching

    def _watch_matrix(self) -> _WatchMatrix:
        """The watchlists in RAM, re-read when the store's watch sequence moved."""
        seq = self._store.watch_seq()
        with self._lock:
            current = self._watch
            if current is not None and current.seq == seq:
                return current
        entries = self._store.watch_entries()
        dim = self.model.dim if self.model is not None else 0
        entries = [e for e in entries if e.vector.shape == (dim,)]
        vectors = (
            np.stack([e.vector for e in entries]) if entries else np.zeros((0, dim), np.float32)
        )
        thresholds = np.array([e.threshold for e in entries], dtype=np.float32)
        matrix = _WatchMatrix(seq, entries, np.ascontiguousarray(vectors), thresholds)
        with self._lock:
            self._watch = matrix
        return matrix

    def watch_matches(
        self, keys: Sequence[Key], sha256s: Sequence[str], vectors: np.ndarray
    ) -> list[MatchRecord]:
        """The watchlist matches of images about to be written: ``vectors`` ``(n, d)
        float32`` (L2-normalized) of ``keys`` (with the SHA-256 of their bytes) against every
        watchlist entry, ``score > threshold`` (the reverse search of the module docstring).

        Returns:
            One :class:`~lookalike.types.MatchRecord` per (image, entry) pair that matches,
            best first within an image; empty when there is no watchlist.
        """
        w = self._watch_matrix()
        if not w.entries or not len(keys):
            return []
        v = np.asarray(vectors, dtype=np.float32)
        if v.ndim != 2 or v.shape[1] != w.vectors.shape[1]:
            return []
        scores = v @ w.vectors.T  # (n, m) float32
        now = time.time()
        found: list[tuple[int, float, MatchRecord]] = []
        for i, j in zip(*np.nonzero(scores > w.thresholds[None, :]), strict=True):
            e = w.entries[j]
            (lid, iid), sha = keys[i], sha256s[i]
            found.append(
                (
                    int(i),
                    -float(scores[i, j]),
                    MatchRecord(
                        event_id=match_event_id(lid, iid, sha, e.name),
                        listing_id=lid,
                        image_id=iid,
                        sha256=sha,
                        watchlist=e.name,
                        entry_id=e.entry_id,
                        hit_listing_id=e.ref_listing_id,
                        hit_image_id=e.ref_image_id,
                        score=float(scores[i, j]),
                        matched_at=now,
                    ),
                )
            )
        found.sort(key=lambda f: (f[0], f[1]))
        return [m for _, _, m in found]

    # ------------------------------------------------------------------ matches and outbox

    def record_matches(self, matches: Sequence[MatchRecord]) -> int:
        """Record matches found outside a write (match on arrival) in one transaction;
        idempotent by event and target. Returns how many were new."""
        return self._store.record_matches(matches)

    def watch_hits(self, name: str, limit: int = 100) -> list[MatchRecord]:
        """The newest ``limit`` matches recorded for watchlist ``name``, oldest first (they
        stay after the watchlist is removed).

        Raises:
            QueryError: a bad name or limit.
        """
        check_watch_name(name)
        if limit < 1:
            raise QueryError("limit must be >= 1")
        return self._store.matches(name, limit=limit, newest=True)

    def matches_since(
        self,
        after_seq: int = 0,
        limit: int = 1000,
        watchlist: str | None = None,
        after_id: int | None = None,
    ) -> list[MatchRecord]:
        """Matches recorded after the change sequence ``after_seq`` (commit order), oldest
        first (by ``seq``, then ``id``), at most ``limit``; of one watchlist when given. A
        tailing reader passes the ``seq`` and ``id`` of the last row it has seen (one write's
        rows share a ``seq``: without ``after_id`` the rest of that write is skipped)."""
        if watchlist is not None:
            check_watch_name(watchlist)
        return self._store.matches(watchlist, after_seq=after_seq, after_id=after_id, limit=limit)

    def latest_matches(self, limit: int = 50) -> list[MatchRecord]:
        """The newest ``limit`` recorded matches, oldest first."""
        return self._store.matches(limit=limit, newest=True)

    def outbox(self, limit: int = 1000) -> list[MatchRecord]:
        """Matches whose event is still to publish (``published_at`` None), oldest first."""
        return self._store.matches(unpublished=True, limit=limit)

    def mark_published(self, ids: Sequence[int]) -> None:
        """Take matches (by :attr:`~lookalike.types.MatchRecord.id`) out of the outbox."""
        self._store.mark_published(ids)
