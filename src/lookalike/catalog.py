"""The facade: one :class:`Catalog` binds one store, one extractor and one engine.

Every face of lookalike (CLI, HTTP, stream, Spark) calls these methods; none reaches past the
catalog into a backend. See ``DESIGN.md``, "The shape of the Python API".

Example::

    import lookalike
    cat = lookalike.open_catalog("./cat")
    report = cat.index(["./photos"])          # IndexReport(added, updated, skipped, failed)
    result = cat.search("query.jpg", k=10, group_by="listing")
    for hit in result.hits:
        print(hit.listing_id, hit.image_id, hit.score)
"""

from __future__ import annotations

import io
import os
import threading
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from .engine import (
    CODES,
    ENGINES,
    ExactEngine,
    VectorCache,
    check_queries,
    make_engine,
    parse_where,
)
from .engine.ann import ANN_KINDS, AnnEngine, AnnIndex, AnnParams
from .errors import ImageError, LookalikeError, ModelMismatchError, NotFoundError, QueryError
from .extract import BaseExtractor, available_extractors, get_extractor, l2_normalize
from .images import ImageSource, decode_image, iter_sources, read_bytes, sha256_hex
from .ingest import IndexReport, Prepared, prepare_bytes, run_index, write_prepared
from .store import Store, open_store
from .thumbs import ensure_thumbnail, thumbnail_path
from .types import FeatureBatch, Hit, Key, ListingRecord, ModelInfo, SearchResult, SearchSpec

DEFAULT_EXTRACTOR = "cnn"
DEFAULT_K = 10
#: Catalog settings and their defaults (``Catalog.configure``, ``lookalike config``).
DEFAULT_SETTINGS: dict[str, str] = {"codes": "int8", "rerank": "4", "index": "auto"}
#: ``index="auto"`` searches a built ANN index once an exact scan would read more than this
#: many bytes of codes (1.5 GB: about 50 ms at the 30 GB/s the int8 scan reaches on the build
#: machine, see ``benchmarks/scan.py`` and ``benchmarks/ann.py``); below it, exact search.
ANN_AUTO_BYTES = 1.5e9
#: Index choices of ``search(index=...)``.
INDEX_CHOICES: tuple[str, ...] = ("auto", "exact", *ANN_KINDS)

ImageInput = str | os.PathLike[str] | bytes | Image.Image


class Catalog:
    """A collection of feature vectors with its store, extractor and engine.

    Build one with :func:`open_catalog`. Thread-safe: searches and writes may come from several
    threads; the engine syncs with the store (also with other processes' writes) before each
    search.

    Args:
        store: the system of record.
        extractor: extractor name for a new catalog (default ``cnn``); must match an existing
            catalog's model.
        device: passed to the ``cnn`` extractor (``auto``, ``cpu``, ``cuda``...).
        engine: ``auto`` (default; ``LOOKALIKE_ENGINE`` overrides), ``fast``, ``numpy`` or
            ``torch`` (see :func:`lookalike.engine.make_engine`).

    Raises:
        ModelMismatchError: ``extractor`` differs from the catalog's model.
        LookalikeError: unknown engine.
    """

    def __init__(
        self,
        store: Store,
        extractor: str | None = None,
        device: str = "auto",
        engine: str | None = None,
    ) -> None:
        self.store = store
        self.device = device
        self.engine_kind = engine or os.environ.get("LOOKALIKE_ENGINE") or "auto"
        if self.engine_kind not in ENGINES:
            raise LookalikeError(
                f"unknown engine {self.engine_kind!r}; use one of {', '.join(ENGINES)}"
            )
        stored = store.model()
        if stored is not None and extractor is not None and extractor != stored.name:
            raise ModelMismatchError(
                f"catalog {store.uri} holds {stored.name!r} vectors ({stored.tag}, d={stored.dim});"
                f" it cannot take {extractor!r} vectors. Use another catalog folder."
            )
        self._extractor_name = extractor or (stored.name if stored else DEFAULT_EXTRACTOR)
        self._extractor: BaseExtractor | None = None
        self._cache: VectorCache | None = None
        self._engine: ExactEngine | None = None
        self._ann: dict[str, AnnEngine] = {}
        self._classifier: Any = None
        self._classifier_stamp: int | None = None
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ basics

    @property
    def uri(self) -> str:
        """Where the catalog lives (folder path)."""
        return self.store.uri

    @property
    def model(self) -> ModelInfo | None:
        """The model of the stored vectors (None for a new, empty catalog)."""
        return self.store.model()

    @property
    def extractor(self) -> BaseExtractor:
        """The extractor that embeds images for this catalog (built on first use).

        Raises:
            LookalikeError: the catalog holds external vectors with no extractor to match.
        """
        with self._lock:
            if self._extractor is None:
                if self._extractor_name not in available_extractors():
                    raise LookalikeError(
                        f"catalog {self.uri} holds vectors of model {self._extractor_name!r}, "
                        "which no installed extractor makes; query it by vector or stored id"
                    )
                options = {"device": self.device} if self._extractor_name == "cnn" else {}
                ext = get_extractor(self._extractor_name, **options)
                self._check_model(ext.info)
                self._extractor = ext
            return self._extractor

    def _check_model(self, info: ModelInfo) -> None:
        stored = self.store.model()
        if stored is not None and stored != info:
            raise ModelMismatchError(
                f"catalog {self.uri} holds vectors of {stored.tag} (d={stored.dim}); "
                f"refusing vectors of {info.tag} (d={info.dim})"
            )

    def _claim(self, info: ModelInfo) -> None:
        self._check_model(info)
        stored = self.store.claim_model(info)
        if stored != info:  # another process claimed first with another model
            raise ModelMismatchError(
                f"catalog {self.uri} holds vectors of {stored.tag} (d={stored.dim}); "
                f"refusing vectors of {info.tag} (d={info.dim})"
            )

    def close(self) -> None:
        """Save ANN indexes that followed new writes, and close the store."""
        for eng in self._ann.values():
            if eng.ann.dirty:
                eng.ann.save(self.ann_folder)
        self.store.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writing

    def index(
        self,
        inputs: Iterable[str | os.PathLike[str] | ImageSource],
        *,
        workers: int | None = None,
        batch_size: int = 32,
        progress: bool = False,
    ) -> IndexReport:
        """Ingest folders, list files, manifests, image files, URLs or :class:`ImageSource` s.

        Idempotent and resumable (see :mod:`lookalike.ingest`); bad files are reported in
        :attr:`IndexReport.failed`, never raised.

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
        return run_index(
            self.store, ext, sources, workers=workers, batch_size=batch_size, progress=progress
        )

    def add(
        self, image: ImageInput, listing_id: str, image_id: str, *, source: str | None = None
    ) -> Literal["added", "updated", "unchanged"]:
        """Add or replace one image under ``(listing_id, image_id)``.

        Args:
            image: file path, URL, encoded bytes, or a PIL image.
            source: recorded in the store (defaults to the path when one is given).

        Returns:
            ``"added"``, ``"updated"`` (new bytes under a stored key) or ``"unchanged"``.

        Raises:
            ImageError: the image cannot be read or decoded.
        """
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
        if status == "failed":
            raise ImageError(reason)
        return status  # type: ignore[return-value]

    def add_many(
        self,
        items: Sequence[tuple[bytes, str, str, str | None]],
        labels: Sequence[dict[str, Any] | None] | None = None,
        decode_threads: int = 1,
    ) -> list[tuple[str, str]]:
        """Add or replace many encoded images in one batch: one model call, one transaction.

        Used by the stream consumer and the HTTP API. A key given twice keeps the last bytes.

        Args:
            items: ``(bytes, listing_id, image_id, source)`` per image (``source`` may be None).
            labels: optional per-item metadata for the ``labels`` column.
            decode_threads: threads decoding in parallel (Pillow releases the GIL).

        Returns:
            ``(status, reason)`` per item, in order: status ``"added"``, ``"updated"``,
            ``"unchanged"`` or ``"failed"`` (reason names the image and what is wrong).
        """
        ext = self.extractor
        self._claim(ext.info)
        keys = [(lid, iid) for _, lid, iid, _ in items]
        known = self.store.existing(keys)
        last = {key: i for i, key in enumerate(keys)}

        def prep(i: int) -> Prepared:
            data, lid, iid, source = items[i]
            src = ImageSource(lid, iid, source or f"{lid}/{iid}")
            if last[(lid, iid)] != i:  # superseded by a later item with the same key
                return Prepared(src, "same")
            return prepare_bytes(data, src, ext, known.get((lid, iid)), thumbnail=True)

        if decode_threads > 1 and len(items) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(decode_threads) as pool:
                prepared = list(pool.map(prep, range(len(items))))
        else:
            prepared = [prep(i) for i in range(len(items))]
        clf = self.classifier
        label_fn = None
        if clf is not None:  # recognition in the write path: store the predicted label

            def label_fn(vectors: np.ndarray) -> list[dict[str, Any]]:
                return [{"predicted": top[0][0], "probability": round(top[0][1], 6)}
                        for top in clf.predict(vectors, k=1)]

        write_prepared(self.store, ext, prepared, labels, label_fn)
        for p in prepared:  # thumbnails for result pages (content-addressed, see thumbs.py)
            if p.thumbnail is not None:
                self._write_thumbnail(p.sha256, p.thumbnail)
        out = []
        for p in prepared:
            key = (p.source.listing_id, p.source.image_id)
            if p.status == "failed":
                out.append(("failed", p.reason))
            elif p.status == "same":
                out.append(("unchanged", ""))
            else:
                out.append(("updated" if key in known else "added", ""))
        return out

    @property
    def classifier(self) -> Any:
        """The classifier trained with ``lookalike train`` (re-read when the file changes), or
        None."""
        from .recognize import load_classifier, model_dir

        path = model_dir(self) / "classifier.joblib"
        stamp = path.stat().st_mtime_ns if path.exists() else None
        if stamp != self._classifier_stamp:
            self._classifier = load_classifier(self) if stamp is not None else None
            self._classifier_stamp = stamp
        return self._classifier

    def predict(self, images: Sequence[ImageInput], k: int = 3) -> list[list[tuple[str, float]]]:
        """Top-``k`` ``(label, probability)`` per image from the catalog's classifier.

        Raises:
            LookalikeError: no classifier (train one with ``lookalike train``).
            ImageError: an image cannot be read.
        """
        clf = self.classifier
        if clf is None:
            raise LookalikeError(f"{self.uri} has no classifier; train one (lookalike train)")
        return clf.predict(self.embed(images), k=k)

    def _write_thumbnail(self, sha256: str, jpeg: bytes) -> None:
        path = thumbnail_path(self.store.folder, sha256)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(jpeg)
            os.replace(tmp, path)

    def thumbnail(self, image_id: str, listing_id: str | None = None) -> Path:
        """Path of the JPEG thumbnail of a stored image (made on first request).

        Raises:
            NotFoundError: no such image. ImageError: no thumbnail can be made.
        """
        key = self._resolve_keys(image_id, listing_id, must_exist=True)[0]
        rec = self.store.get(key)
        if rec is None:
            raise NotFoundError(f"no image {image_id!r} in {self.uri}")
        return ensure_thumbnail(self.store.folder, rec.sha256, rec.source)

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
            QueryError: NaN/inf values, or mismatched lengths.
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
        self._claim(info)
        if normalize:
            v = l2_normalize(v)
        return self.store.upsert(
            FeatureBatch(
                list(listing_ids),
                list(image_ids),
                v,
                [sha256_hex(row.tobytes()) for row in v],
            )
        )

    def delete(self, image_id: str, listing_id: str | None = None) -> int:
        """Delete an image by ``image_id`` (and ``listing_id`` when ids repeat across listings).

        Returns:
            Rows deleted (0 if none matched).

        Raises:
            QueryError: ``image_id`` matches several listings and ``listing_id`` is not given.
        """
        keys = self._resolve_keys(image_id, listing_id, must_exist=False)
        return self.store.delete(keys)

    def update_listing(self, listing_id: str, **attrs: Any) -> None:
        """Set live attributes of a listing (``stock_level=0``, ``color="red"``; None removes)."""
        for name, value in attrs.items():
            if value is not None and not isinstance(value, (str, int, float, bool)):
                raise QueryError(f"listing attribute {name!r} must be str, number or bool")
        self.store.upsert_listing(listing_id, attrs)

    def get_listing(self, listing_id: str) -> ListingRecord:
        """A listing's attributes.

        Raises:
            NotFoundError: no such listing.
        """
        rec = self.store.get_listing(listing_id)
        if rec is None:
            raise NotFoundError(f"no listing {listing_id!r} in {self.uri}")
        return rec

    # ------------------------------------------------------------------ engine

    @property
    def settings(self) -> dict[str, str]:
        """The catalog's settings (stored values over :data:`DEFAULT_SETTINGS`)."""
        return {**DEFAULT_SETTINGS, **self.store.settings()}

    def configure(
        self, *, codes: str | None = None, rerank: int | None = None, index: str | None = None
    ) -> dict[str, str]:
        """Change settings, stored with the catalog; the engine is rebuilt on the next search.

        Args:
            codes: what the scan reads: ``int8`` (default, 1 byte a value), ``float16``, or
                ``float32``. Answers are exact with every kind.
            rerank: candidates re-scored per requested hit before the exactness check.
            index: default of ``search(index=...)``: ``auto``, ``exact``, or an ANN kind.

        Returns:
            The settings now in force.

        Raises:
            LookalikeError: unknown codes or rerank < 1.
        """
        if codes is not None:
            if codes not in CODES:
                raise LookalikeError(f"unknown codes {codes!r}; use one of {', '.join(CODES)}")
            self.store.set_setting("codes", codes)
        if rerank is not None:
            if rerank < 1:
                raise LookalikeError(f"rerank must be >= 1, got {rerank}")
            self.store.set_setting("rerank", str(rerank))
        if index is not None:
            if index not in INDEX_CHOICES:
                raise LookalikeError(
                    f"unknown index {index!r}; use one of {', '.join(INDEX_CHOICES)}"
                )
            self.store.set_setting("index", index)
        with self._lock:
            self._engine = None
        return self.settings

    @property
    def engine(self) -> ExactEngine:
        """The search engine, synced with the store (built on first use)."""
        with self._lock:
            self._sync()
            assert self._engine is not None
            return self._engine

    @property
    def ann_folder(self) -> Path:
        """Where ANN indexes are saved: ``<catalog>/ann``."""
        return Path(self.store.folder) / "ann"

    def build_index(self, kind: str = "hnsw", **params: int) -> AnnIndex:
        """Build (train and fill) an ANN index of every stored vector and save it.

        Args:
            kind: ``ivf``, ``ivfpq`` or ``hnsw``.
            **params: :class:`~lookalike.engine.ann.AnnParams` fields (``nlist``, ``nprobe``,
                ``pq_m``, ``hnsw_m``, ``ef_construction``, ``ef_search``, ``overfetch``).

        Raises:
            LookalikeError: unknown kind or parameter, or too few vectors to train.
        """
        try:
            p = AnnParams(kind=kind, **params)
        except TypeError as exc:
            raise LookalikeError(f"bad index parameter: {exc}") from None
        with self._lock:
            cache = self._sync()
            ann = AnnIndex.build(cache, p)
            ann.save(self.ann_folder)
            self._ann[kind] = AnnEngine(cache, ann)
            return ann

    def _ann_engine(self, kind: str) -> AnnEngine | None:
        """The loaded ANN engine of ``kind`` (read from disk on first use), or None."""
        eng = self._ann.get(kind)
        if eng is None:
            ann = AnnIndex.load(self.ann_folder, kind)
            if ann is None:
                return None
            assert self._cache is not None
            if ann.dim != self._cache.dim:
                raise LookalikeError(f"{self.ann_folder}/{kind}.faiss has d={ann.dim}; rebuild it")
            eng = self._ann[kind] = AnnEngine(self._cache, ann)
        return eng

    def _choose_engine(self, index: str | None) -> ExactEngine:
        choice = index or self.settings["index"]
        if choice not in INDEX_CHOICES:
            raise QueryError(f"unknown index {choice!r}; use one of {', '.join(INDEX_CHOICES)}")
        if self._engine is None or self._cache is None:
            self._sync()
        assert self._engine is not None and self._cache is not None
        if choice == "exact":
            return self._engine
        if choice != "auto":
            eng = self._ann_engine(choice)
            if eng is None:
                raise QueryError(
                    f"no {choice} index in {self.uri}; build one with "
                    f"`lookalike ann build --kind {choice}`"
                )
            return eng
        per_row = {"int8": 1, "float16": 2}.get(getattr(self._engine, "codes", ""), 4)
        if self._cache.n_alive * self._cache.dim * per_row >= ANN_AUTO_BYTES:
            for kind in ANN_KINDS:
                eng = self._ann_engine(kind)
                if eng is not None:
                    return eng
        return self._engine

    def _sync(self) -> VectorCache:
        """Bring the in-RAM cache up to date with the store (incremental)."""
        with self._lock:
            model = self.store.model()
            if model is None:
                raise QueryError(f"catalog {self.uri} is empty; index some images first")
            if self._cache is None or self._cache.dim != model.dim:
                self._cache = VectorCache(model.dim)
                self._engine = None
            if self._engine is None:
                settings = self.settings
                self._engine = make_engine(
                    self._cache,
                    self.engine_kind,
                    codes=settings["codes"],
                    rerank=int(settings["rerank"]),
                )
            cache = self._cache
            cache.apply(self.store.changes_since(cache.seq))
            seq, listings = self.store.listings_since(cache.listing_seq)
            cache.update_listings(seq, listings)
            return cache

    def embed(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Embed images with the catalog's extractor: ``n`` inputs -> ``(n, d) float32``.

        Raises:
            ImageError: an image cannot be read or decoded.
        """
        ext = self.extractor
        arrays = []
        for im in images:
            if isinstance(im, Image.Image):
                pil = im.convert("RGB")
            elif isinstance(im, bytes):
                pil = decode_image(im, name="query image", draft_size=ext.draft_size).image
            else:
                loc = os.fspath(im)
                pil = decode_image(read_bytes(loc), name=loc, draft_size=ext.draft_size).image
            arrays.append(ext.preprocess(pil))
        return ext.embed(np.stack(arrays)) if arrays else np.zeros((0, ext.dim), np.float32)

    def _resolve_keys(self, image_id: str, listing_id: str | None, must_exist: bool) -> list[Key]:
        if listing_id is not None:
            keys = [(listing_id, image_id)]
            if must_exist and not self.store.existing(keys):
                raise NotFoundError(f"no image {image_id!r} in listing {listing_id!r}")
            return keys
        keys = self.store.find_image(image_id)
        if len(keys) > 1:
            raise QueryError(
                f"image id {image_id!r} is in {len(keys)} listings "
                f"({', '.join(k[0] for k in keys[:5])}); give the listing id too"
            )
        if must_exist and not keys:
            raise NotFoundError(f"no image {image_id!r} in {self.uri}")
        return keys

    def get_image_vector(self, image_id: str, listing_id: str | None = None) -> np.ndarray:
        """The stored ``(d,) float32`` vector of an image.

        Raises:
            NotFoundError: no such image. QueryError: ambiguous id.
        """
        key = self._resolve_keys(image_id, listing_id, must_exist=True)[0]
        rec = self.store.get(key)
        if rec is None:
            raise NotFoundError(f"no image {image_id!r} in {self.uri}")
        return rec.vector

    def search(
        self,
        query: ImageInput | None = None,
        *,
        image_id: str | None = None,
        listing_id: str | None = None,
        vector: np.ndarray | None = None,
        k: int | None = None,
        group_by: Literal["listing"] | None = None,
        agg: Literal["max", "mean", "sum-top-n"] = "max",
        top_n: int = 3,
        threshold: float | None = None,
        where: str | None = None,
        save: bool = False,
        normalize: bool = True,
        index: str | None = None,
    ) -> SearchResult | list[SearchResult]:
        """Search by image, by stored id, or by vector.

        Exact by default: every vector is scored (through the fast engine's codes, with exact
        re-scoring). With an ANN index, candidates come from the index and are scored exactly.

        Exactly one of ``query`` (path, URL, bytes, PIL image), ``image_id`` (stored image;
        ``listing_id`` disambiguates) or ``vector`` must be given.

        Args:
            vector: ``(d,)`` -> one result; ``(n, d)`` -> a list of ``n`` results.
            k: hits to return; default 10, or no limit when ``threshold`` is set.
            group_by: ``"listing"``: one hit per listing, scored by ``agg``.
            agg: ``max`` | ``mean`` | ``sum-top-n`` (sum of the ``top_n`` best images).
            threshold: only hits with ``score > threshold``.
            where: filter on listing attributes, e.g. ``"stock_level > 0"``
                (grammar: :mod:`lookalike.engine.filters`).
            save: write the hits to ``query_results`` under the result's ``query_id``.
            normalize: L2-normalize query vectors (so scores are cosines).
            index: ``exact``, ``ivf``, ``ivfpq``, ``hnsw``, or ``auto`` (the catalog's setting,
                default ``auto``: ANN when one is built and the collection is large, see
                :data:`ANN_AUTO_BYTES`).

        Returns:
            A :class:`SearchResult`, or a list of them for a batch of vectors.

        Raises:
            QueryError: bad arguments, NaN in a vector, unknown attribute in ``where``.
            NotFoundError: ``image_id`` not stored. ImageError: query image unreadable.
        """
        given = sum(x is not None for x in (query, image_id, vector))
        if given != 1:
            raise QueryError("give exactly one of: a query image, image_id=, vector=")
        batch = False
        if vector is not None:
            q = np.asarray(vector)
            batch = q.ndim == 2
        elif image_id is not None:
            q = self.get_image_vector(image_id, listing_id)
        else:
            q = self.embed([query])[0]  # type: ignore[list-item]
        with self._lock:
            cache = self._sync()
            q = check_queries(q, cache.dim)
            if normalize:
                q = l2_normalize(q)
            mask = None
            if where:
                expr = parse_where(where)
                known = (
                    {"listing_id"}.union(*cache.listings.attrs)
                    if len(cache.listings)
                    else {"listing_id"}
                )
                unknown = sorted(expr.names() - known)
                if unknown:
                    raise QueryError(
                        f"where: unknown listing attribute(s) {', '.join(unknown)}; known: "
                        f"{', '.join(sorted(known))}"
                    )
                mask = expr.mask(cache.listings)
            spec = SearchSpec(
                k=k if k is not None else (None if threshold is not None else DEFAULT_K),
                threshold=threshold,
                group_by=group_by,
                agg=agg,
                top_n=top_n,
                listing_mask=mask,
            )
            raw = self._choose_engine(index).search(q, spec)
            results = []
            for r in raw:
                hits = [
                    Hit(
                        listing_id=cache.keys[row][0],
                        image_id=cache.keys[row][1],
                        score=float(score),
                        rank=i + 1,
                        n_images=int(cnt) if group_by == "listing" else None,
                    )
                    for i, (row, score, cnt) in enumerate(
                        zip(r.rows, r.scores, r.counts, strict=True)
                    )
                ]
                results.append(SearchResult(uuid.uuid4().hex, hits))
        if save:
            for res in results:
                self.store.save_results(
                    res.query_id, [(h.listing_id, h.image_id, h.score) for h in res.hits]
                )
                res.saved = True
        return results if batch else results[0]

    def stats(self) -> dict[str, Any]:
        """Catalog facts: model, image and listing counts, engine cache memory (bytes)."""
        model = self.store.model()
        out: dict[str, Any] = {"catalog": self.uri, "images": self.store.count()}
        if model is None:
            out["model"] = None
            return out
        cache = self._sync()
        engine = self._engine
        out.update(
            model={"name": model.name, "version": model.version, "dim": model.dim},
            listings=int(np.unique(cache.codes[cache.alive]).size),
            engine=engine.name if engine else None,
            codes=getattr(engine, "codes", "float32"),
            cache_rows=cache.n_rows,
            cache_bytes=cache.nbytes(),
            codes_bytes=int(getattr(engine, "nbytes", lambda: 0)()),
        )
        return out


def open_catalog(
    location: str | os.PathLike[str],
    extractor: str | None = None,
    *,
    device: str = "auto",
    create: bool = True,
    engine: str | None = None,
) -> Catalog:
    """Open (or create) the catalog at ``location``.

    Args:
        location: catalog folder (embedded SQLite store).
        extractor: for a new catalog, the extractor (default ``cnn``); for an existing one,
            checked against the stored model.
        device: ``cnn`` inference device: ``auto`` (GPU if present), ``cpu``, ``cuda``.
        create: create the catalog if missing.
        engine: search engine: ``auto`` (default), ``fast``, ``numpy``, ``torch``.

    Raises:
        NotFoundError: missing catalog and ``create`` is False.
        ModelMismatchError: ``extractor`` differs from the catalog's model.
    """
    return Catalog(
        open_store(Path(location) if not isinstance(location, str) else location, create=create),
        extractor=extractor,
        device=device,
        engine=engine,
    )
