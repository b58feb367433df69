"""Writing to the catalog: ingest, single and batched adds, external vectors, deletes, listing
attributes, and the classifier that labels images as they are written."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import ImageError, LookalikeError, ModelMismatchError, QueryError
from ..extract import l2_normalize
from ..files import atomic_write
from ..images import ImageSource, iter_sources, read_bytes, sha256_hex
from ..types import (
    FeatureBatch,
    ModelInfo,
    WriteStatus,
    id_problem,
)
from .base import ImageInput
from .classifier import Classifier, load_classifier, save_classifier
from .ingest import IndexReport, Prepared, prepare_bytes, run_index, write_prepared
from .thumbs import thumbnail_path
from .validate import check_id, check_listing_attrs
from .watch import CatalogWatch

log = logging.getLogger(__name__)


def _source_problem(source: ImageSource) -> str | None:
    """Why an ingest source's key breaks the id rule (see :func:`lookalike.types.id_problem`)."""
    return id_problem(source.listing_id, "listing id") or id_problem(source.image_id, "image id")


class CatalogWrites(CatalogWatch):
    """The write half of :class:`~lookalike.catalog.Catalog`."""

    def index(
        self,
        inputs: Iterable[str | os.PathLike[str] | ImageSource],
        *,
        workers: int | None = None,
        batch_size: int = 32,
        progress: bool = False,
    ) -> IndexReport:
        """Ingest folders, list files, manifests, image files, URLs or :class:`ImageSource` s.

        Idempotent and resumable (see :mod:`lookalike.catalog.ingest`); bad files, and sources
        whose listing or image id breaks the id rule (:func:`lookalike.types.id_problem`), are
        reported in :attr:`IndexReport.failed`, never raised.

        Args:
            inputs: what to ingest (see :func:`lookalike.images.iter_sources`).
            workers: decode processes (default: one per core).
            batch_size: images per model call and per store transaction.
            progress: tqdm progress bar with images/s on stderr.

        Raises:
            SourceError: an input does not exist or a manifest is malformed.
            ModelMismatchError: the catalog holds another model's vectors.
        """
        items = list(inputs)
        paths = [x for x in items if not isinstance(x, ImageSource)]
        sources = [x for x in items if isinstance(x, ImageSource)]
        sources.extend(iter_sources(paths))
        ext = self.extractor
        self._claim(ext.info)
        good: list[ImageSource] = []
        refused: list[tuple[str, str]] = []
        for s in sources:
            problem = _source_problem(s)
            if problem is None:
                good.append(s)
            else:
                refused.append((s.location, f"{s.location}: {problem}"))
                log.warning("skipped %s", refused[-1][1])
        report = run_index(
            self._store,
            ext,
            good,
            workers=workers,
            batch_size=batch_size,
            progress=progress,
            watch=self.watch_matches,
        )
        report.failed[:0] = refused
        return report

    def add(
        self, image: ImageInput, listing_id: str, image_id: str, *, source: str | None = None
    ) -> WriteStatus:
        """Add or replace one image under ``(listing_id, image_id)``.

        Args:
            image: file path, URL, encoded bytes, or a PIL image.
            source: recorded in the store (defaults to the path when one is given).

        Returns:
            ``added``, ``updated`` (new bytes under a stored key) or ``unchanged``.

        Raises:
            ImageError: the image cannot be read or decoded.
            QueryError: a bad listing or image id (:func:`lookalike.types.id_problem`).
        """
        check_id(listing_id, "listing id")
        check_id(image_id, "image id")
        if isinstance(image, Image.Image):
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            data = buf.getvalue()
        elif isinstance(image, bytes):
            data = image
        else:
            source = source or os.fspath(image)
            data = read_bytes(image)
        ((status, reason),) = self.add_many([(data, listing_id, image_id, source)])
        if status == WriteStatus.FAILED:
            raise ImageError(reason)
        return status

    def add_many(
        self,
        items: Sequence[tuple[bytes, str, str, str | None]],
        labels: Sequence[dict[str, Any] | None] | None = None,
        decode_threads: int = 1,
    ) -> list[tuple[WriteStatus, str]]:
        """Add or replace many encoded images in one batch: one model call, one transaction.

        Used by the stream consumer and the HTTP API. A key given twice keeps the last bytes.
        With a classifier attached (:meth:`set_classifier`), each new image's top prediction is
        stored in its ``labels`` (``predicted``, ``probability``).

        Args:
            items: ``(bytes, listing_id, image_id, source)`` per image (``source`` may be None).
            labels: optional per-item metadata for the ``labels`` column.
            decode_threads: threads decoding in parallel (Pillow releases the GIL).

        Returns:
            ``(status, reason)`` per item, in order; ``reason`` names the image and what is
            wrong when the status is ``failed``, else it is empty. An item with a bad listing
            or image id (:func:`lookalike.types.id_problem`) fails alone; the rest is written.
        """
        ext = self.extractor
        self._claim(ext.info)
        bad = {
            i: problem
            for i, (_, lid, iid, _) in enumerate(items)
            if (problem := id_problem(lid, "listing id") or id_problem(iid, "image id"))
        }
        keys = [(lid, iid) for _, lid, iid, _ in items]
        known = self._store.existing([k for i, k in enumerate(keys) if i not in bad])
        last = {key: i for i, key in enumerate(keys) if i not in bad}

        def prep(i: int) -> Prepared:
            data, lid, iid, source = items[i]
            if i in bad:
                src = ImageSource(str(lid), str(iid), "")
                return Prepared(src, "failed", reason=bad[i])
            src = ImageSource(lid, iid, source or f"{lid}/{iid}")
            if last[(lid, iid)] != i:  # superseded by a later item with the same key
                return Prepared(src, "same")
            prepared = prepare_bytes(data, src, ext, known.get((lid, iid)), thumbnail=True)
            prepared.data = data  # kept by the store while a reindex runs (no file holds it)
            return prepared

        if decode_threads > 1 and len(items) > 1:
            with ThreadPoolExecutor(decode_threads) as pool:
                prepared = list(pool.map(prep, range(len(items))))
        else:
            prepared = [prep(i) for i in range(len(items))]
        try:
            clf = self.classifier
        except LookalikeError as exc:  # trained on the vectors of a model replaced since
            log.warning("images are written without predicted labels: %s", exc)
            clf = None
        label_fn = None
        if clf is not None:  # recognition in the write path: store the predicted label

            def label_fn(vectors: np.ndarray) -> list[dict[str, Any]]:
                return [
                    {"predicted": top[0][0], "probability": round(top[0][1], 6)}
                    for top in clf.predict(vectors, k=1)
                ]

        write_prepared(self._store, ext, prepared, labels, label_fn, watch=self.watch_matches)
        for p in prepared:  # thumbnails for result pages (content-addressed, see thumbs.py)
            if p.thumbnail is not None and p.sha256:
                path = thumbnail_path(self.folder, p.sha256)
                if not path.exists():
                    atomic_write(path, p.thumbnail)
        out: list[tuple[WriteStatus, str]] = []
        for p in prepared:
            key = (p.source.listing_id, p.source.image_id)
            if p.status == "failed":
                out.append((WriteStatus.FAILED, p.reason))
            elif p.status == "same":
                out.append((WriteStatus.UNCHANGED, ""))
            else:
                out.append((WriteStatus.UPDATED if key in known else WriteStatus.ADDED, ""))
        self._notify_written(
            [
                ((p.source.listing_id, p.source.image_id), st)
                for p, (st, _) in zip(prepared, out, strict=True)
            ]
        )
        return out

    def add_vectors(
        self,
        listing_ids: Sequence[str],
        image_ids: Sequence[str],
        vectors: np.ndarray,
        *,
        model: ModelInfo | None = None,
        normalize: bool = True,
    ) -> int:
        """Store externally made vectors (upsert by key, one transaction).

        Args:
            listing_ids, image_ids: keys, ``n`` each.
            vectors: ``(n, d)`` float array.
            model: the model the vectors come from (default: this catalog's extractor).
            normalize: L2-normalize rows first (the store holds unit vectors).

        Returns:
            Rows written.

        Raises:
            ModelMismatchError: ``model`` (or ``d``) differs from the catalog's.
            QueryError: NaN/inf values, mismatched lengths, or a bad id
                (:func:`lookalike.types.id_problem`): nothing is written then.
        """
        info = model or self.extractor.info
        v = np.asarray(vectors, dtype=np.float32)
        if v.ndim != 2 or v.shape[1] != info.dim:
            raise ModelMismatchError(
                f"vectors have shape {v.shape}; model {info.tag} has d={info.dim}"
            )
        if not np.isfinite(v).all():
            raise QueryError("vectors contain NaN or infinity")
        if not (len(listing_ids) == len(image_ids) == len(v)):
            raise QueryError("listing_ids, image_ids and vectors differ in length")
        for lid, iid in zip(listing_ids, image_ids, strict=True):
            check_id(lid, "listing id")
            check_id(iid, "image id")
        if normalize:
            v = l2_normalize(v)
        sha = [sha256_hex(row.tobytes()) for row in v]
        return self.import_batch(info, FeatureBatch(list(listing_ids), list(image_ids), v, sha))

    def import_batch(self, model: ModelInfo, batch: FeatureBatch) -> int:
        """Upsert whole stored rows (vectors with their SHA-256, source, size and labels), as
        read back from a Parquet lake, in one transaction.

        Returns:
            Rows written.

        Raises:
            ModelMismatchError: ``model`` differs from the catalog's.
            QueryError: a bad listing or image id (nothing is written then).
        """
        for lid, iid in zip(batch.listing_ids, batch.image_ids, strict=True):
            check_id(lid, "listing id")
            check_id(iid, "image id")
        self._claim(model)
        keys = list(zip(batch.listing_ids, batch.image_ids, strict=True))
        matches = self.watch_matches(keys, batch.sha256s, batch.vectors)
        return self._store.upsert(dataclasses.replace(batch, model=model), matches)

    def delete(self, image_id: str, listing_id: str | None = None) -> int:
        """Delete an image by ``image_id`` (and ``listing_id`` when ids repeat across listings).

        Returns:
            Rows deleted (0 if none matched).

        Raises:
            QueryError: ``image_id`` matches several listings and ``listing_id`` is not given.
        """
        return self._store.delete(self._find_keys(image_id, listing_id, must_exist=False))

    def update_listing(self, listing_id: str, /, **attrs: Any) -> None:
        """Set live attributes of a listing (``stock_level=0``, ``color="red"``; None removes).

        What every store can hold (:mod:`lookalike.catalog.validate`): names non-empty, at
        most 128 characters, no control characters, not ``listing_id``; values None, bool,
        int in the int64 range, finite float, or text of at most 4,096 characters without
        control characters; ``stock_level`` a whole number; ``etag`` text (an int is stored
        as its decimal text).

        Raises:
            QueryError: a bad listing id, or a refused name or value (the message says which
                and why); nothing is written then.
        """
        check_id(listing_id, "listing id")
        self._store.upsert_listing(listing_id, check_listing_attrs(attrs))

    def update_listings(self, updates: Mapping[str, Mapping[str, Any]]) -> int:
        """Set live attributes of many listings in one transaction (``{listing_id: {name:
        value}}``, each as :meth:`update_listing`): a CSV import or a nightly stock feed of
        millions of listings at thousands a second, where one call a listing commits (and
        syncs to disk) each time.

        Returns:
            Listings updated.

        Raises:
            QueryError: a bad listing id, or a refused name or value (the message names the
                listing); nothing is written then.
        """
        checked: list[tuple[str, dict[str, Any]]] = []
        for listing_id, attrs in updates.items():
            check_id(listing_id, "listing id")
            try:
                checked.append((listing_id, check_listing_attrs(dict(attrs))))
            except QueryError as exc:
                raise QueryError(f"listing {listing_id!r}: {exc}") from None
        self._store.upsert_listings(checked)
        return len(checked)

    # ------------------------------------------------------------------ recognition

    @property
    def classifier(self) -> Classifier | None:
        """The classifier set with :meth:`set_classifier` (``lookalike train``), re-read when
        its file changes, or None.

        Raises:
            LookalikeError: it was trained on vectors of another model.
        """
        path = self.folder / "models" / "classifier.joblib"
        stamp = path.stat().st_mtime_ns if path.exists() else None
        with self._lock:
            if stamp != self._classifier_stamp:
                self._classifier = (
                    load_classifier(path.parent, self.model) if stamp is not None else None
                )
                self._classifier_stamp = stamp
            return self._classifier

    def set_classifier(self, classifier: Classifier) -> Path:
        """Save ``classifier`` with the catalog (``<folder>/models``); from then on it labels
        every image written (see :meth:`add_many`) and answers :meth:`predict`.

        Returns:
            The model file's path.

        Raises:
            ModelMismatchError: it expects vectors of another model than the catalog's.
        """
        if self.model is not None:
            self._check_model(classifier.model_info)
        return save_classifier(self.folder / "models", classifier)

    def predict(self, images: Sequence[ImageInput], k: int = 3) -> list[list[tuple[str, float]]]:
        """Top-``k`` ``(label, probability)`` per image from the catalog's classifier.

        Raises:
            LookalikeError: no classifier (train one with ``lookalike train``).
            ImageError: an image cannot be read.
        """
        clf = self.classifier
        if clf is None:
            raise LookalikeError(
                f"catalog {self.name!r} has no classifier; train one (lookalike train)"
            )
        return clf.predict(self.embed(images), k=k)
