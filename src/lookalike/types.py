"""Shared types and vocabularies: the words every layer of lookalike speaks.

This module owns the data that crosses module boundaries (keys, model identity, stored rows,
search requests and results) and the closed vocabularies (aggregation, index kind, code kind,
engine kind, write status). It imports nothing of the project, so every layer may import it
(``DESIGN.md``, "Parts and where they live").

Vocabularies are :class:`enum.StrEnum` s: a member *is* its string (``Aggregation.MAX ==
"max"``), so APIs accept plain strings and JSON carries plain strings. Each face derives its
choices from these enums (CLI option types, HTTP schemas, the web page via ``GET /options``),
never from a copy.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

Key = tuple[str, str]
"""``(listing_id, image_id)``: the primary key of an image."""


# ---------------------------------------------------------------------- vocabularies


class Aggregation(StrEnum):
    """Per-listing score of a grouped search (``group_by="listing"``).

    ``max``: the listing's best image; ``mean``: the mean over its scored images;
    ``sum-top-n``: the sum of its ``top_n`` best images (can exceed 1).
    """

    MAX = "max"
    MEAN = "mean"
    SUM_TOP_N = "sum-top-n"


class GroupBy(StrEnum):
    """What a search groups hits by: only ``listing`` (one hit per listing)."""

    LISTING = "listing"


class IndexKind(StrEnum):
    """Where search candidates come from.

    ``exact``: every live vector is scored; ``ivf``, ``ivfpq``, ``hnsw``: an approximate
    (ANN) index built with ``lookalike ann build``; ``auto``: exact, or a built ANN index once
    the collection is large (see ``lookalike.catalog.ANN_AUTO_BYTES``).
    """

    AUTO = "auto"
    EXACT = "exact"
    IVF = "ivf"
    IVFPQ = "ivfpq"
    HNSW = "hnsw"

    @classmethod
    def ann(cls) -> tuple[IndexKind, ...]:
        """The approximate kinds, in the order ``auto`` tries them: ivf, ivfpq, hnsw."""
        return (cls.IVF, cls.IVFPQ, cls.HNSW)


class CodeKind(StrEnum):
    """What the exact scan reads: compressed copies of the vectors (quantized *codes*).

    ``int8``: 1 byte a value (per-dimension symmetric scale); ``float16``: 2 bytes;
    ``float32``: the vectors themselves. Answers are exact with every kind (re-scoring).
    """

    INT8 = "int8"
    FLOAT16 = "float16"
    FLOAT32 = "float32"

    @property
    def itemsize(self) -> int:
        """Bytes per value: 1, 2 or 4."""
        return {"int8": 1, "float16": 2, "float32": 4}[self.value]


class EngineKind(StrEnum):
    """Which exact engine scans: ``fast`` (compiled kernels), ``numpy`` (the reference),
    ``torch`` (a GPU), or ``auto`` (torch on a CUDA GPU, else fast, else numpy)."""

    AUTO = "auto"
    FAST = "fast"
    NUMPY = "numpy"
    TORCH = "torch"


class WriteStatus(StrEnum):
    """What happened to one image offered for writing.

    ``added``: a new key; ``updated``: new bytes under a stored key; ``unchanged``: the same
    bytes (SHA-256) were already stored; ``failed``: it could not be read or decoded.
    """

    ADDED = "added"
    UPDATED = "updated"
    UNCHANGED = "unchanged"
    FAILED = "failed"


def choices(vocabulary: type[StrEnum]) -> tuple[str, ...]:
    """The values of a vocabulary as plain strings, in declaration order."""
    return tuple(m.value for m in vocabulary)


# ---------------------------------------------------------------------- ids

#: Longest listing or image id accepted, in characters.
MAX_ID_LENGTH = 1024
#: Bidirectional embedding/override (U+202A-U+202E) and isolate (U+2066-U+2069) characters:
#: they make an id display as another string, so ids may not contain them.
BIDI_CONTROLS = frozenset(chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A)))


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be stored as given, or None: a control character (Unicode category
    ``Cc``: U+0000-U+001F, U+007F-U+009F, tabs and newlines included) or a lone surrogate (not
    encodable as UTF-8, so no store can hold it). The character is named as ``U+XXXX``."""
    for i, ch in enumerate(text):
        cat = unicodedata.category(ch)
        if cat == "Cc":
            return f"contains the control character U+{ord(ch):04X} at position {i + 1}"
        if cat == "Cs":
            return f"contains the lone surrogate U+{ord(ch):04X} at position {i + 1}"
    return None


def id_problem(value: object, what: str = "id") -> str | None:
    """Why ``value`` is not acceptable as a listing or image id, or None when it is.

    The one rule for ids, applied on every write path (the catalog raises ``QueryError`` with
    this text; faces may use it to declare their own limits). An id is a string, not empty,
    not only whitespace, at most :data:`MAX_ID_LENGTH` characters, without control characters
    (category ``Cc``) or lone surrogates, and without bidi override/isolate characters
    (:data:`BIDI_CONTROLS`).

    Args:
        what: names the id in the message (``"listing id"``, ``"image id"``).
    """
    if not isinstance(value, str):
        return f"{what} must be a string, not {type(value).__name__}"
    if not value.strip():
        return f"{what} must not be empty or only whitespace (got {value!r})"
    shown = repr(value) if len(value) <= 60 else repr(value[:60]) + "..."
    if len(value) > MAX_ID_LENGTH:
        return f"{what} {shown} is {len(value)} characters long; the limit is {MAX_ID_LENGTH}"
    problem = text_problem(value)
    if problem is None:
        bidi = next((i for i, ch in enumerate(value) if ch in BIDI_CONTROLS), None)
        if bidi is not None:
            problem = (
                f"contains the bidi control character U+{ord(value[bidi]):04X} at position"
                f" {bidi + 1}"
            )
    if problem is not None:
        return (
            f"{what} {shown} {problem}; ids may not contain control or bidi override/isolate"
            " characters"
        )
    return None


# ---------------------------------------------------------------------- model identity


@dataclass(frozen=True)
class ModelInfo:
    """Identity of the vectors in a collection: which extractor made them.

    Attributes:
        name: extractor name (``"cnn"``, ``"hog"``, or any name for externally made vectors).
        version: extractor version; any change that alters vectors changes it.
        dim: vector dimension ``d``.
    """

    name: str
    version: str
    dim: int

    @property
    def tag(self) -> str:
        """``name@version``, the value of the ``model`` column in the store."""
        return f"{self.name}@{self.version}"


# ---------------------------------------------------------------------- stored rows


@dataclass
class FeatureBatch:
    """Rows to upsert into ``features``, column-wise.

    Attributes:
        listing_ids, image_ids: keys, ``n`` each.
        vectors: ``(n, d) float32``, L2-normalized.
        sha256s: hex SHA-256 of each image's file bytes (or of the vector for external vectors).
        sources: path or URL each image was read from (``None`` if unknown).
        widths, heights: original image size in pixels (``None`` if unknown).
        labels: optional per-row JSON-able metadata dicts.
        model: the model that made ``vectors``; the store refuses the batch when the catalog
            holds another one by the time it writes (a ``lookalike reindex`` swapped meanwhile).
        blobs: the encoded image bytes per row (writes from bytes); kept only while a reindex
            runs, so that it can re-extract rows written meanwhile (``lookalike.store.reindex``).

    Raises:
        ValueError: the columns have different lengths.
    """

    listing_ids: list[str]
    image_ids: list[str]
    vectors: np.ndarray
    sha256s: list[str]
    sources: list[str | None] = field(default_factory=list)
    widths: list[int | None] = field(default_factory=list)
    heights: list[int | None] = field(default_factory=list)
    labels: list[dict[str, Any] | None] = field(default_factory=list)
    model: ModelInfo | None = None
    blobs: list[bytes | None] | None = None

    def __post_init__(self) -> None:
        n = len(self.listing_ids)
        for name in ("sources", "widths", "heights", "labels"):
            if not getattr(self, name):
                setattr(self, name, [None] * n)
        lengths = {
            len(self.image_ids),
            len(self.sha256s),
            len(self.sources),
            len(self.widths),
            len(self.heights),
            len(self.labels),
            self.vectors.shape[0],
            *([len(self.blobs)] if self.blobs is not None else []),
        }
        if lengths != {n}:
            raise ValueError(f"FeatureBatch columns have different lengths: {sorted(lengths)}")

    def __len__(self) -> int:
        return len(self.listing_ids)


@dataclass
class ImageRecord:
    """One stored image (a ``features`` row).

    Attributes:
        vector: ``(d,) float32``, L2-normalized.
        model: the model tag (``name@version``) that made the vector.
        source: path or URL it was read from, or None.
        sha256: hex SHA-256 of the file bytes.
        width, height: original size in pixels, or None.
        ingested_at: Unix time in seconds.
        labels: JSON-able metadata (e.g. a stored prediction), or None.
    """

    listing_id: str
    image_id: str
    vector: np.ndarray
    model: str
    source: str | None
    sha256: str
    width: int | None
    height: int | None
    ingested_at: float
    labels: dict[str, Any] | None

    @property
    def key(self) -> Key:
        """``(listing_id, image_id)``."""
        return (self.listing_id, self.image_id)


@dataclass
class Changes:
    """What changed in a store after a change-sequence number.

    Apply ``deleted`` first, then ``upserted``: a key in both was deleted and written again.

    Attributes:
        seq: the sequence number these changes bring the reader up to.
        upserted: keys of rows written (inserted or replaced), ordered by
            ``(listing_id, image_id)``.
        vectors: ``(len(upserted), d) float32``.
        deleted: keys of rows deleted.
        model: the collection's model in the same snapshot (None: empty, or not told); a
            reader whose rows are of another model must reload (a reindex swapped models).
    """

    seq: int
    upserted: list[Key]
    vectors: np.ndarray
    deleted: list[Key]
    model: ModelInfo | None = None


@dataclass
class ListingRecord:
    """A ``listings`` row: live attributes to filter and join on.

    Attributes:
        attrs: every attribute, ``stock_level`` and ``etag`` included.
    """

    listing_id: str
    attrs: dict[str, Any]


@dataclass
class SavedHit:
    """A ``query_results`` row: one hit written back by ``search(save=True)``.

    Attributes:
        rank: 1 for the best hit. score: as returned by the search.
        created_at: Unix time in seconds.
    """

    query_id: str
    rank: int
    listing_id: str
    image_id: str
    score: float
    created_at: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``listing_id``, ``image_id``, ``score``, ``rank``, ``created_at``."""
        return {
            "listing_id": self.listing_id,
            "image_id": self.image_id,
            "score": round(float(self.score), 6),
            "rank": self.rank,
            "created_at": self.created_at,
        }


# ---------------------------------------------------------------------- search


@dataclass(frozen=True)
class SearchSpec:
    """What to return for each query (the engine's view of a search request).

    Attributes:
        k: how many hits (images or listings); None = no limit (only with ``threshold``).
        threshold: keep hits with ``score > threshold`` (aggregate score when grouped).
        group_by: None (image-level) or ``"listing"``.
        agg: per-listing aggregation (:class:`Aggregation`).
        top_n: ``n`` of ``sum-top-n``.
        listing_mask: ``(n_listings,) bool`` over the cache's listing index; False excludes
            the listing.

    The spec is checked by the engines (``lookalike.engine.check_spec`` raises
    ``QueryError`` with :meth:`problem`), not here, so this module needs nothing of the
    project.
    """

    k: int | None = 10
    threshold: float | None = None
    group_by: GroupBy | None = None
    agg: Aggregation = Aggregation.MAX
    top_n: int = 3
    listing_mask: np.ndarray | None = None

    def problem(self) -> str | None:
        """What is wrong with this spec, in one line, or None when it is valid."""
        if self.k is None and self.threshold is None:
            return "k=None (no limit) needs a threshold"
        if self.k is not None and self.k < 1:
            return f"k must be >= 1, got {self.k}"
        if self.group_by not in (None, *choices(GroupBy)):
            return f"group_by must be 'listing' or None, got {self.group_by!r}"
        if self.agg not in choices(Aggregation):
            return f"agg must be one of {', '.join(choices(Aggregation))}, got {self.agg!r}"
        if self.top_n < 1:
            return f"top_n must be >= 1, got {self.top_n}"
        if self.threshold is not None and not np.isfinite(self.threshold):
            return f"threshold must be a finite number, got {self.threshold}"
        return None

    @property
    def grouped(self) -> bool:
        """True when hits are listings (``group_by="listing"``)."""
        return self.group_by == GroupBy.LISTING


@dataclass
class RawHits:
    """Hits of one query, best first, as vector-cache row numbers (an engine's answer).

    Attributes:
        rows: ``(m,) int64`` cache rows (for grouped hits: the listing's best image).
        scores: ``(m,) float32`` scores (aggregates when grouped).
        counts: ``(m,) int64`` images that contributed (1 for image-level hits).
    """

    rows: np.ndarray
    scores: np.ndarray
    counts: np.ndarray

    @classmethod
    def empty(cls) -> RawHits:
        """No hits."""
        return cls(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64))


@dataclass
class Hit:
    """One search hit.

    Attributes:
        listing_id: the listing.
        image_id: the image (for a grouped hit: the listing's best-scoring image).
        score: inner product with the query in [-1, 1] (grouped: the aggregate; ``sum-top-n``
            can exceed 1).
        rank: 1 for the best hit.
        n_images: grouped hits only: how many of the listing's images were scored.
    """

    listing_id: str
    image_id: str
    score: float
    rank: int
    n_images: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``listing_id``, ``image_id``, ``score``, ``rank`` (+ ``n_images``)."""
        d: dict[str, Any] = {
            "listing_id": self.listing_id,
            "image_id": self.image_id,
            "score": round(float(self.score), 6),
            "rank": self.rank,
        }
        if self.n_images is not None:
            d["n_images"] = self.n_images
        return d


@dataclass
class SearchResult:
    """The hits of one query, best first, under a ``query_id``.

    Attributes:
        query_id: unique id (32 hex digits); the key in ``query_results`` when saved.
        hits: ordered best first.
        saved: True if written to ``query_results``.
    """

    query_id: str
    hits: list[Hit] = field(default_factory=list)
    saved: bool = False

    @property
    def scores(self) -> np.ndarray:
        """``(len(hits),) float32`` scores."""
        return np.array([h.score for h in self.hits], dtype=np.float32)

    @property
    def listing_ids(self) -> list[str]:
        """Listing ids of the hits, in order."""
        return [h.listing_id for h in self.hits]

    @property
    def image_ids(self) -> list[str]:
        """Image ids of the hits, in order."""
        return [h.image_id for h in self.hits]

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape shared by every face: ``{"query_id": ..., "hits": [...]}``."""
        return {"query_id": self.query_id, "hits": [h.to_dict() for h in self.hits]}


# ---------------------------------------------------------------------- watchlists and matches


@dataclass
class WatchEntry:
    """A ``watchlists`` row: one reference vector of a named watchlist (a standing query that
    every image written to the catalog is compared with).

    Attributes:
        name: the watchlist (``[A-Za-z0-9_-]``, 1-64 characters: it is a NATS subject token
            of ``lookalike.watch.<name>``).
        entry_id: the entry within its watchlist (the id rule of :func:`id_problem`).
        vector: ``(d,) float32``, L2-normalized.
        threshold: an image matches the entry when ``score > threshold`` (cosine in [-1, 1]).
        source: where the reference came from (a file name, a stored image, ``vector``).
        ref_listing_id, ref_image_id: the stored image the entry was taken from (its
            thumbnail shows the entry), or None.
        created_at: Unix time in seconds (set by the store).
    """

    name: str
    entry_id: str
    vector: np.ndarray = field(repr=False)
    threshold: float
    source: str | None = None
    ref_listing_id: str | None = None
    ref_image_id: str | None = None
    created_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict without the vector."""
        return {
            "name": self.name,
            "entry_id": self.entry_id,
            "threshold": round(float(self.threshold), 6),
            "source": self.source,
            "ref_listing_id": self.ref_listing_id,
            "ref_image_id": self.ref_image_id,
            "created_at": self.created_at,
        }


@dataclass
class MatchRecord:
    """A ``matches`` row: an image written to the catalog matched a watchlist entry, or
    (match on arrival) a stored catalog image. The table is also the outbox of the match
    events: a row with ``published_at`` None is still to be published.

    Attributes:
        event_id: the idempotency key of the event the row belongs to (its ``Nats-Msg-Id``):
            one event per arriving image and watchlist, or per arriving image for catalog
            hits; derived from the image's key and SHA-256, so a replay gives the same id.
        listing_id, image_id, sha256: the arriving image.
        watchlist: the watchlist's name, or None for a catalog hit.
        entry_id: the watchlist entry matched, or None for a catalog hit.
        hit_listing_id, hit_image_id: the catalog image hit, or the stored image the
            watchlist entry was taken from; None when there is none.
        score: the inner product (cosine), float.
        matched_at: Unix seconds when the match was found.
        published_at: Unix seconds when its event was published, None while in the outbox.
        seq: the store's change sequence of the write that recorded it (commit order; set
            by the store).
        id: the row's number in the store (set by the store).
    """

    event_id: str
    listing_id: str
    image_id: str
    sha256: str
    watchlist: str | None
    entry_id: str | None
    hit_listing_id: str | None
    hit_image_id: str | None
    score: float
    matched_at: float
    published_at: float | None = None
    seq: int = 0
    id: int = 0

    @property
    def target(self) -> str:
        """What the row matched, unique within its event: the entry id of a watchlist
        match, ``listing_id`` U+001F ``image_id`` of a catalog hit (ids hold no control
        characters, so the two cannot collide)."""
        if self.watchlist is not None:
            return f"w\x1f{self.entry_id}"
        return f"c\x1f{self.hit_listing_id}\x1f{self.hit_image_id}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every column."""
        return {
            "id": self.id,
            "event_id": self.event_id,
            "listing_id": self.listing_id,
            "image_id": self.image_id,
            "sha256": self.sha256,
            "watchlist": self.watchlist,
            "entry_id": self.entry_id,
            "hit_listing_id": self.hit_listing_id,
            "hit_image_id": self.hit_image_id,
            "score": round(float(self.score), 6),
            "matched_at": self.matched_at,
            "published_at": self.published_at,
        }
