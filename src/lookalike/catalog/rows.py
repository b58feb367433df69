"""Reading stored rows from the catalog: images, listings, key lookup, exports in batches,
analysis columns, saved results and thumbnails."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import NotFoundError, QueryError
from ..types import (
    Hit,
    ImageRecord,
    Key,
    ListingRecord,
    SavedHit,
    SearchResult,
)
from .base import CatalogBase
from .thumbs import ensure_thumbnail, thumbnail_bytes
from .validate import check_lookup_id

#: The store setting that holds the near-duplicate calibration (JSON).
CALIBRATION_SETTING = "calibration"


class CatalogRows(CatalogBase):
    """The row-reading part of :class:`~lookalike.catalog.Catalog`."""

    def count(self) -> int:
        """Number of stored images."""
        return self._store.count()

    def get_listing(self, listing_id: str) -> ListingRecord:
        """A listing's attributes.

        Raises:
            NotFoundError: no such listing.
        """
        rec = self._store.get_listing(check_lookup_id(listing_id, "listing id"))
        if rec is None:
            raise NotFoundError(f"no listing {listing_id!r} in catalog {self.name!r}")
        return rec

    def listings(self) -> list[ListingRecord]:
        """Every listing that has attributes."""
        return self._store.listings_since(-1)[1]

    def resolve_key(self, image_id: str, listing_id: str | None = None) -> Key:
        """The key of a stored image given its ``image_id`` (and ``listing_id`` when ids
        repeat across listings).

        Raises:
            NotFoundError: no such image. QueryError: the id is in several listings.
        """
        return self._find_keys(image_id, listing_id, must_exist=True)[0]

    def get_image(self, image_id: str, listing_id: str | None = None) -> ImageRecord:
        """A stored image's row: vector, source, SHA-256, size, labels.

        Raises:
            NotFoundError: no such image. QueryError: the id is in several listings.
        """
        rec = self._store.get(self.resolve_key(image_id, listing_id))
        if rec is None:  # deleted between the two reads
            raise NotFoundError(f"no image {image_id!r} in catalog {self.name!r}")
        return rec

    def get_image_vector(self, image_id: str, listing_id: str | None = None) -> np.ndarray:
        """The stored ``(d,) float32`` vector of an image.

        Raises:
            NotFoundError: no such image. QueryError: ambiguous id.
        """
        return self.get_image(image_id, listing_id).vector

    def iter_records(self, batch_size: int = 1024) -> Iterator[list[ImageRecord]]:
        """Every stored image, ordered by ``(listing_id, image_id)``, in batches of at most
        ``batch_size`` rows (one store query per batch: used to export the catalog)."""
        return self._store.iter_records(batch_size)

    def sha256s(self) -> dict[Key, str]:
        """SHA-256 of the file bytes of every stored image."""
        return self._store.all_sha256()

    def sources(self) -> dict[Key, str | None]:
        """The recorded source (path or URL) of every stored image."""
        return self._store.all_sources()

    def save_analysis(self, keys: Sequence[Key], columns: dict[str, Sequence[Any]]) -> None:
        """Store per-image analysis columns (``cluster``, ``cluster_distance``,
        ``outlier_score``, ``x``, ``y``), one value per key."""
        self._store.save_analysis(keys, columns)

    def analysis(self) -> dict[Key, dict[str, Any]]:
        """The stored per-image analysis of every image that still exists."""
        return self._store.analysis()

    def save_results(self, query_id: str, hits: Sequence[tuple[str, str, float]]) -> None:
        """Write ``(listing_id, image_id, score)`` hits, best first, to ``query_results``."""
        self._store.save_results(query_id, hits)

    def saved_results(self, query_id: str) -> SearchResult:
        """The hits a search saved under ``query_id`` (``search(save=True)``).

        Raises:
            NotFoundError: nothing was saved under that id.
        """
        rows = self._store.get_results(check_lookup_id(query_id, "query id"))
        if not rows:
            raise NotFoundError(f"no saved results for query {query_id!r}")
        hits = [Hit(r.listing_id, r.image_id, r.score, r.rank) for r in rows]
        return SearchResult(query_id, hits, saved=True)

    def delete_results(self, query_id: str) -> None:
        """Delete the hits saved under ``query_id``.

        Raises:
            NotFoundError: nothing is saved under that id.
        """
        if not self._store.delete_results(query_id=check_lookup_id(query_id, "query id")):
            raise NotFoundError(f"no saved results for query {query_id!r}")

    def prune_results(
        self, older_than: float, *, limit: int | None = None, now: float | None = None
    ) -> int:
        """Delete the results of every search saved more than ``older_than`` seconds before
        ``now`` (default: the present), oldest first, at most ``limit`` searches (None: all).
        A search's hits go together (one transaction per call).

        Returns:
            The number of saved searches deleted.

        Raises:
            QueryError: ``older_than`` is negative or not finite, or ``limit`` is below 1.
        """
        if not math.isfinite(older_than) or older_than < 0:
            raise QueryError(
                f"older_than must be a finite number of seconds >= 0, not {older_than}"
            )
        if limit is not None and limit < 1:
            raise QueryError(f"limit must be at least 1, not {limit}")
        cutoff = (time.time() if now is None else now) - older_than
        return self._store.delete_results(before=cutoff, limit=limit)

    def save_calibration(self, calibration: dict[str, Any]) -> None:
        """Store a near-duplicate calibration (``lookalike.analytics.calibrate``) with the
        catalog, replacing the previous one (a JSON-able dict)."""
        self._store.set_setting(CALIBRATION_SETTING, json.dumps(calibration, sort_keys=True))

    def calibration(self) -> dict[str, Any] | None:
        """The stored near-duplicate calibration, or None."""
        text = self._store.settings().get(CALIBRATION_SETTING)
        return json.loads(text) if text else None

    def has_saved_results(self, query_id: str) -> bool:
        """Whether any hit is saved under ``query_id``."""
        return bool(self._store.get_results(check_lookup_id(query_id, "query id")))

    def all_saved_results(self) -> list[SavedHit]:
        """Every saved hit, by query and rank (used to export the catalog)."""
        return self._store.all_results()

    def thumbnail(self, image_id: str, listing_id: str | None = None) -> Path:
        """Path of the JPEG thumbnail of a stored image (made on first request).

        Raises:
            NotFoundError: no such image. ImageError: no thumbnail can be made.
        """
        rec = self.get_image(image_id, listing_id)
        return ensure_thumbnail(self.folder, rec.sha256, rec.source)

    def thumbnail_data(self, key: Key) -> bytes:
        """The JPEG bytes of a stored image's thumbnail (at most 192 px; cached in the catalog
        folder, made from the source file on first use).

        Raises:
            NotFoundError: no such image. ImageError: no thumbnail can be made (the source
                file is gone, remote or changed, and none was cached).
        """
        rec = self._store.get(key)
        if rec is None:
            raise NotFoundError(f"no image {key[1]!r} in listing {key[0]!r}")
        return thumbnail_bytes(self.folder, rec.sha256, rec.source)
