"""Real-time recognition: match on arrival and watchlist events (the faces publish them).

**Match on arrival** (:func:`match_arrivals`): the images of an arriving batch are searched
against the catalog in one ``Catalog.search_batch`` call (one scan for the batch), each
image's own row excluded, and the other images of its own listing too unless
``own_listing``; every image with at least one hit scoring above the threshold gives one
:class:`MatchEvent`, whose body is::

    {"event_id", "listing_id", "image_id", "event_time", "matched_at",
     "matches": [{"listing_id", "image_id", "score"}, ...], "labels": {...}}

``event_time`` is when the image was sent (the message's ``Event-Time``, Unix seconds, or
None), ``matched_at`` when the match was found, ``labels`` the image's stored labels (the
classifier's prediction when one is attached) or ``{}``. ``event_id`` (also the
``Nats-Msg-Id``) is derived from the image's key and SHA-256
(:func:`lookalike.catalog.match_event_id`), so a redelivered image gives the same id.

**Watchlist events** (:func:`watch_events`): the ``matches`` rows that the catalog recorded
with each write (``lookalike.catalog.watch``) are grouped into one event per arriving image
and watchlist, for ``lookalike.watch.<name>``::

    {"event_id", "watchlist", "listing_id", "image_id", "matched_at",
     "matches": [{"entry_id", "score", "listing_id", "image_id"}, ...], "labels": {...}}

(``listing_id``/``image_id`` of a match: the stored image the entry was taken from, or
None.) The default thresholds come from the faces (the catalog's calibrated near-duplicate
threshold, ``lookalike.analytics.calibrate.near_duplicate_threshold``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..catalog import Catalog, match_event_id
from ..errors import NotFoundError, QueryError
from ..images import iter_sources, read_bytes
from ..types import Key, MatchRecord, SearchResult, WatchEntry

#: Subject of the match-on-arrival events (``lookalike stream --match-subject``).
DEFAULT_MATCH_SUBJECT = "lookalike.matches"
#: Subject prefix of watchlist events: ``lookalike.watch.<name>``.
WATCH_SUBJECT_PREFIX = "lookalike.watch"
#: Hits reported per matching image (``--match-k``).
DEFAULT_MATCH_K = 5
#: Images embedded per model call when a watchlist is made from files.
EMBED_BATCH = 32
#: Extra hits asked of the one batched search, so that removing the image itself and the
#: other images of its listing still leaves ``k``; an image whose listing has more is asked
#: again on its own, with a larger ``k``.
OWN_LISTING_MARGIN = 16


@dataclass
class ArrivalMatching:
    """How arriving images are matched against the catalog.

    Attributes:
        threshold: an image matches when a hit scores above it (cosine).
        k: most hits reported per image.
        where: a filter on listing attributes the hits must pass (``Catalog.search``).
        own_listing: also report other images of the arriving image's own listing.
    """

    threshold: float
    k: int = DEFAULT_MATCH_K
    where: str | None = None
    own_listing: bool = False


@dataclass
class Arrival:
    """An arriving image: its key, the SHA-256 of its bytes, when it was sent (Unix seconds,
    or None) and its labels (None: read from the store)."""

    listing_id: str
    image_id: str
    sha256: str
    event_time: float | None = None
    labels: dict[str, Any] | None = None

    @property
    def key(self) -> Key:
        """``(listing_id, image_id)``."""
        return (self.listing_id, self.image_id)


@dataclass
class MatchEvent:
    """One event to publish: its id (the ``Nats-Msg-Id``), its JSON body, and the
    ``matches`` rows that record it."""

    event_id: str
    body: dict[str, Any]
    records: list[MatchRecord] = field(default_factory=list)


def stored_vectors(cat: Catalog, keys: Sequence[Key]) -> tuple[np.ndarray, list[bool]]:
    """The stored vectors of ``keys``, read from the store by key (a primary-key lookup each;
    not the vector cache, whose key map a new snapshot would rebuild over every row): ``(n,
    d) float32`` (zero rows where a key is not stored), and which keys were found."""
    model = cat.model
    out = np.zeros((len(keys), model.dim if model else 0), dtype=np.float32)
    found = []
    for i, (lid, iid) in enumerate(keys):
        try:
            out[i] = cat.get_image_vector(iid, lid)
            found.append(True)
        except NotFoundError:
            found.append(False)
    return out, found


def match_arrivals(
    cat: Catalog,
    arrivals: Sequence[Arrival],
    vectors: np.ndarray,
    matching: ArrivalMatching,
) -> list[MatchEvent]:
    """The match-on-arrival events of a batch (see the module docstring).

    Args:
        cat: the catalog searched (the arrivals may already be stored in it).
        arrivals: the arriving images.
        vectors: their ``(n, d) float32`` vectors, L2-normalized.
        matching: threshold, k, filter, own-listing rule.

    Returns:
        One event per arriving image with at least one hit above the threshold, in order.

    Raises:
        QueryError: a bad ``where`` or bad vectors.
    """
    if not arrivals or cat.model is None:
        return []
    k = matching.k + 1 + (0 if matching.own_listing else OWN_LISTING_MARGIN)
    results = cat.search_batch(
        np.asarray(vectors, dtype=np.float32),
        k=k,
        threshold=matching.threshold,
        where=matching.where,
    )
    matched_at = time.time()
    events = []
    for i, (arr, res) in enumerate(zip(arrivals, results, strict=True)):
        hits = _keep(arr, res, matching)
        if len(hits) < matching.k and len(res.hits) >= k:  # a large own listing: ask alone
            res = cat.search(
                vector=vectors[i], k=None, threshold=matching.threshold, where=matching.where
            )
            hits = _keep(arr, res, matching)
        if hits:
            events.append(_event(cat, arr, hits, matched_at))
    return events


def _keep(arr: Arrival, res: SearchResult, matching: ArrivalMatching) -> list[tuple[Key, float]]:
    """The hits of ``res`` that count for ``arr``, at most ``k``."""
    out = []
    for h in res.hits:
        if (h.listing_id, h.image_id) == arr.key:
            continue
        if not matching.own_listing and h.listing_id == arr.listing_id:
            continue
        out.append(((h.listing_id, h.image_id), h.score))
        if len(out) == matching.k:
            break
    return out


def _event(
    cat: Catalog, arr: Arrival, hits: list[tuple[Key, float]], matched_at: float
) -> MatchEvent:
    event_id = match_event_id(arr.listing_id, arr.image_id, arr.sha256, None)
    labels = arr.labels
    if labels is None:
        try:
            labels = cat.get_image(arr.image_id, arr.listing_id).labels
        except NotFoundError:
            labels = None
    body = {
        "event_id": event_id,
        "listing_id": arr.listing_id,
        "image_id": arr.image_id,
        "event_time": arr.event_time,
        "matched_at": matched_at,
        "matches": [
            {"listing_id": lid, "image_id": iid, "score": round(float(s), 6)}
            for (lid, iid), s in hits
        ],
        "labels": labels or {},
    }
    records = [
        MatchRecord(
            event_id=event_id,
            listing_id=arr.listing_id,
            image_id=arr.image_id,
            sha256=arr.sha256,
            watchlist=None,
            entry_id=None,
            hit_listing_id=lid,
            hit_image_id=iid,
            score=float(s),
            matched_at=matched_at,
        )
        for (lid, iid), s in hits
    ]
    return MatchEvent(event_id, body, records)


def watch_subject(name: str | None, prefix: str = WATCH_SUBJECT_PREFIX) -> str:
    """The subject of a watchlist's events, ``<prefix>.<name>`` (None: the catalog-hit
    subject :data:`DEFAULT_MATCH_SUBJECT`)."""
    return f"{prefix}.{name}" if name is not None else DEFAULT_MATCH_SUBJECT


def watch_events(cat: Catalog, records: Sequence[MatchRecord]) -> list[MatchEvent]:
    """Group outbox rows into events: one per ``event_id`` (arriving image and watchlist), in
    the order of their first row (see the module docstring)."""
    groups: dict[str, list[MatchRecord]] = {}
    for r in records:
        groups.setdefault(r.event_id, []).append(r)
    events = []
    for event_id, rows in groups.items():
        first = rows[0]
        try:
            labels = cat.get_image(first.image_id, first.listing_id).labels
        except NotFoundError:  # deleted since
            labels = None
        body = {
            "event_id": event_id,
            "watchlist": first.watchlist,
            "listing_id": first.listing_id,
            "image_id": first.image_id,
            "matched_at": first.matched_at,
            "matches": [
                {
                    "entry_id": r.entry_id,
                    "score": round(float(r.score), 6),
                    "listing_id": r.hit_listing_id,
                    "image_id": r.hit_image_id,
                }
                for r in sorted(rows, key=lambda r: -r.score)
            ],
            "labels": labels or {},
        }
        events.append(MatchEvent(event_id, body, list(rows)))
    return events


def add_to_watchlist(
    cat: Catalog,
    name: str,
    threshold: float,
    inputs: Sequence[str | os.PathLike[str]] = (),
    stored: Sequence[Key] = (),
) -> list[WatchEntry]:
    """Add images to watchlist ``name`` (created on first use): image files, folders, list
    files or manifests (``inputs``; entry id = the image id ``lookalike index`` would give,
    e.g. ``truck-17/front.jpg``), embedded with the catalog's extractor in batches; and stored
    images by key (``stored``; their stored vectors, entry id the image id).

    Returns:
        The watchlist's entries afterwards.

    Raises:
        SourceError: an input does not exist. ImageError: an image cannot be read.
        QueryError: nothing to add, or as ``Catalog.watch_add``. NotFoundError: a stored key
            is not stored.
    """
    sources = list(iter_sources(list(inputs))) if inputs else []
    if not sources and not stored:
        raise QueryError("give at least one image (a file, a folder) or a stored image")
    entries: list[WatchEntry] = []
    for start in range(0, len(sources), EMBED_BATCH):
        chunk = sources[start : start + EMBED_BATCH]
        entries = cat.watch_add_images(
            name,
            [read_bytes(s.location) for s in chunk],
            [s.image_id for s in chunk],
            threshold,
            sources=[os.path.basename(s.location.rstrip("/")) or s.location for s in chunk],
        )
    if stored:
        entries = cat.watch_add_stored(name, list(stored), threshold)
    return entries
