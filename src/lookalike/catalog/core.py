"""The :class:`Catalog`: one store, one extractor and one engine set behind the Python API.

Every face of lookalike (CLI, HTTP, stream, Spark) and every service (analytics, recognition,
the Parquet lake, evaluation, benchmarks) calls these public methods; none reaches past the
catalog into a store, and nothing outside this package touches a private member
(``DESIGN.md``, "The shape of the Python API").
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..engine import SearchEngine, VectorCache, check_queries, check_spec
from ..engine.ann import AnnEngine, AnnIndex, AnnParams
from ..errors import LookalikeError, QueryError, StoreError
from ..extract import l2_normalize
from ..store import open_store
from ..types import (
    Aggregation,
    CodeKind,
    GroupBy,
    Hit,
    IndexKind,
    Key,
    RawHits,
    SearchResult,
    SearchSpec,
    choices,
)
from .base import DEFAULT_K, ImageInput
from .engines import SearchRequest, parsed_where
from .reindex import CatalogReindex
from .rows import CatalogRows
from .writes import CatalogWrites

#: Searches by stored id tried again when a reindex switched the model under them.
MODEL_RETRIES = 5


class _ModelMovedError(Exception):
    """The catalog's model changed between reading a query vector and scanning (a reindex
    swapped): the scan would mix models, so it is not answered."""


class Catalog(CatalogReindex, CatalogWrites, CatalogRows):
    """A collection of feature vectors with its store, extractor and engines.

    Build one with :func:`open_catalog`. Thread-safe: searches and writes may come from several
    threads; the engine syncs with the store (also with other processes' writes) before each
    search.

    Args:
        store: the system of record.
        extractor: extractor name for a new catalog (default ``cnn``); must match an existing
            catalog's model.
        device: passed to the ``cnn`` extractor (``auto``, ``cpu``, ``cuda``...).
        engine: :class:`~lookalike.types.EngineKind` (default ``auto``; ``LOOKALIKE_ENGINE``
            overrides).

    Raises:
        ModelMismatchError: ``extractor`` differs from the catalog's model.
        LookalikeError: unknown engine.
    """

    # ------------------------------------------------------------------ engine

    @property
    def settings(self) -> dict[str, str]:
        """The catalog's search settings (stored values over :data:`DEFAULT_SETTINGS`)."""
        return self._engines.settings()

    def configure(
        self, *, codes: str | None = None, rerank: int | None = None, index: str | None = None
    ) -> dict[str, str]:
        """Change settings, stored with the catalog; the engine is rebuilt on the next search.

        Args:
            codes: what the scan reads (:class:`~lookalike.types.CodeKind`): ``int8``
                (default, 1 byte a value), ``float16``, or ``float32``. Answers are exact with
                every kind.
            rerank: candidates re-scored per requested hit before the exactness check.
            index: default of ``search(index=...)`` (:class:`~lookalike.types.IndexKind`).

        Returns:
            The settings now in force.

        Raises:
            LookalikeError: unknown codes or index, or rerank < 1.
        """
        if codes is not None:
            if codes not in choices(CodeKind):
                raise LookalikeError(
                    f"unknown codes {codes!r}; use one of {', '.join(choices(CodeKind))}"
                )
            self._store.set_setting("codes", codes)
        if rerank is not None:
            if rerank < 1:
                raise LookalikeError(f"rerank must be >= 1, got {rerank}")
            self._store.set_setting("rerank", str(rerank))
        if index is not None:
            if index not in choices(IndexKind):
                raise LookalikeError(
                    f"unknown index {index!r}; use one of {', '.join(choices(IndexKind))}"
                )
            self._store.set_setting("index", index)
        self._engines.reset()
        return self.settings

    def vector_cache(self, attributes: bool = True) -> VectorCache:
        """An immutable snapshot of the in-RAM vector cache, synced with the store first
        (incremental): ``cache.vectors`` ``(n_rows, d) float32``, ``cache.keys``,
        ``cache.alive``. Later writes never change it (the next call returns a newer one).

        Args:
            attributes: also bring ``cache.listings`` (the listing attributes) up to date;
                False skips reading them when they were never loaded (1.1 s at 250k listings).

        Raises:
            QueryError: the catalog is empty.
        """
        snap = self._engines.snapshot(attributes=attributes)
        self._engines.start_background()
        return snap

    def iter_vectors(self, batch_size: int = 65536) -> Iterator[tuple[list[Key], np.ndarray]]:
        """The live vectors of the (synced) vector cache, in cache order, as ``(keys,
        (m, d) float32)`` batches of at most ``batch_size`` rows."""
        cache = self.vector_cache(attributes=False)
        live = np.flatnonzero(cache.alive)
        for start in range(0, len(live), batch_size):
            rows = live[start : start + batch_size]
            yield [cache.keys[r] for r in rows], cache.vectors[rows]

    def search_engine(self, index: str | None = None) -> SearchEngine:
        """The synced engine that answers a search with ``index=`` (see :meth:`search`), for
        batch jobs that call it directly (the analytics): it is shared with :meth:`search`, so
        use it from one thread, with no concurrent searches; its rows refer to
        ``engine.cache``.

        Raises:
            QueryError: the catalog is empty, unknown index, or the ANN index is not built.
        """
        return self._engines.engine(index)

    @property
    def engine(self) -> SearchEngine:
        """The exact search engine, synced with the store (built on first use)."""
        return self.search_engine(IndexKind.EXACT)

    def ann_engine(self, kind: str) -> AnnEngine | None:
        """The synced ANN engine of ``kind`` (``ivf``, ``ivfpq``, ``hnsw``), or None when no
        such index was built."""
        self._engines.engine(IndexKind.EXACT)
        return self._engines.ann(kind)

    def build_index(self, kind: str = IndexKind.HNSW, **params: int) -> AnnIndex:
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
        return self._engines.build(p)

    # ------------------------------------------------------------------ search

    def search(
        self,
        query: ImageInput | None = None,
        *,
        image_id: str | None = None,
        listing_id: str | None = None,
        vector: np.ndarray | None = None,
        k: int | None = None,
        group_by: GroupBy | str | None = None,
        agg: Aggregation | str = Aggregation.MAX,
        top_n: int = 3,
        threshold: float | None = None,
        where: str | None = None,
        save: bool = False,
        normalize: bool = True,
        index: IndexKind | str | None = None,
    ) -> SearchResult:
        """Search by image, by stored id, or by one vector; one query, one result.

        Exact by default: every vector is scored (through the fast engine's codes, with exact
        re-scoring). With an ANN index, candidates come from the index and are scored exactly.
        For many query vectors at once use :meth:`search_batch`.

        Exactly one of ``query`` (path, URL, bytes, PIL image), ``image_id`` (stored image;
        ``listing_id`` disambiguates) or ``vector`` (``(d,)`` float) must be given.

        Args:
            k: hits to return; default 10, or no limit when ``threshold`` is set.
            group_by: ``"listing"``: one hit per listing, scored by ``agg``.
            agg: ``max`` | ``mean`` | ``sum-top-n`` (sum of the ``top_n`` best images).
            threshold: only hits with ``score > threshold``.
            where: filter on listing attributes, e.g. ``"stock_level > 0"``
                (grammar: :mod:`lookalike.engine.filters`).
            save: write the hits to ``query_results`` under the result's ``query_id``.
            normalize: L2-normalize the query vector (so scores are cosines).
            index: :class:`~lookalike.types.IndexKind`; default: the catalog's setting
                (``auto``: ANN when one is built and the collection is large, see
                :data:`~lookalike.catalog.engines.ANN_AUTO_BYTES`).

        Raises:
            QueryError: bad arguments, a ``(n, d)`` vector (use :meth:`search_batch`), NaN in
                the vector, a zero vector (norm below :data:`MIN_QUERY_NORM`) with
                ``normalize=True``, unknown attribute in ``where``.
            NotFoundError: ``image_id`` not stored. ImageError: query image unreadable.
        """
        given = sum(x is not None for x in (query, image_id, vector))
        if given != 1:
            raise QueryError("give exactly one of: a query image, image_id=, vector=")
        options = dict(k=k, group_by=group_by, agg=agg, top_n=top_n, threshold=threshold)
        if vector is not None:
            q = np.asarray(vector)
            if q.ndim != 1:
                raise QueryError(
                    f"search takes one (d,) vector, got shape {q.shape}; use search_batch"
                )
            return self._search(q, options, where, save, normalize, index)[0]
        for _ in range(MODEL_RETRIES):  # the query and the scanned vectors of one model
            if image_id is not None:
                rec = self.get_image(image_id, listing_id)
                q, model = rec.vector, rec.model
            else:
                assert query is not None
                ext = self.extractor  # the stored model's (a version mismatch raises here)
                q, model = self.embed_with(ext, [query])[0], ext.info.tag
            with contextlib.suppress(_ModelMovedError):
                return self._search(q, dict(options), where, save, normalize, index, model)[0]
        raise StoreError("the catalog's model kept changing during the search; retry")

    def search_batch(
        self,
        vectors: np.ndarray,
        *,
        k: int | None = None,
        group_by: GroupBy | str | None = None,
        agg: Aggregation | str = Aggregation.MAX,
        top_n: int = 3,
        threshold: float | None = None,
        where: str | None = None,
        save: bool = False,
        normalize: bool = True,
        index: IndexKind | str | None = None,
    ) -> list[SearchResult]:
        """Search ``(n, d)`` query vectors in one pass; one result per row, in order.

        The options mean what they mean in :meth:`search`; a batch shares one scan of the
        codes, so it costs far less than ``n`` single searches.

        Raises:
            QueryError: not ``(n, d)``, NaN in a vector, a zero vector with ``normalize=True``,
                bad options.
        """
        q = np.asarray(vectors)
        if q.ndim != 2:
            raise QueryError(f"search_batch takes (n, d) vectors, got shape {q.shape}")
        options = dict(k=k, group_by=group_by, agg=agg, top_n=top_n, threshold=threshold)
        return self._search(q, options, where, save, normalize, index)

    def _search(
        self,
        q: np.ndarray,
        options: dict[str, Any],
        where: str | None,
        save: bool,
        normalize: bool,
        index: str | None,
        model: str | None = None,
    ) -> list[SearchResult]:
        """Check the request here, then scan it with the concurrent ones (``EngineSet.search``:
        one batch per group of compatible options, no catalog-wide lock held). With
        ``model`` (the tag of the query's model), vectors of another model are never
        scanned: :class:`_ModelMovedError` instead."""
        if options["k"] is None and options["threshold"] is None:
            options["k"] = DEFAULT_K
        snap = self._engines.current()
        if model and snap.model != model:
            snap = self._engines.snapshot(attributes=False)
            if snap.model != model:
                raise _ModelMovedError(model)
        q = check_queries(q, snap.dim)
        if normalize:
            q = _normalize_queries(q)
        spec = check_spec(SearchSpec(**options))
        if where:
            parsed_where(where)  # a syntax error is this caller's alone
        if index is not None and index not in choices(IndexKind):
            raise QueryError(f"unknown index {index!r}; use one of {', '.join(choices(IndexKind))}")
        try:
            answer = self._engines.search(SearchRequest(q, spec, where or None, index))
        except QueryError:  # e.g. the dimension: the batch synced to a new model first
            if model and self._engines.current().model != model:
                raise _ModelMovedError(model) from None
            raise
        if model and answer.snapshot.model != model:
            raise _ModelMovedError(model)
        results = [_result(answer.snapshot, raw, spec) for raw in answer.hits]
        if save:
            for res in results:
                self.save_results(
                    res.query_id, [(h.listing_id, h.image_id, h.score) for h in res.hits]
                )
                res.saved = True
        return results

    def stats(self) -> dict[str, Any]:
        """Catalog facts, read from the store (or the engine files' header, when no write came
        since it was written) without loading any vector.

        Keys: ``catalog``, ``images``, ``model`` (``name``, ``version``, ``dim``; None when
        empty), ``listings`` (listings with an image), and the engine's
        (:meth:`~lookalike.catalog.engines.EngineSet.facts`): ``engine``, ``codes`` (the code
        kind the scan reads), ``engine_loaded`` (whether this process holds the vector cache),
        ``cache_source`` (``files``: mapped from the engine files, ``store``: read from the
        store), ``cache_rows``, ``cache_bytes`` (the float32 vector cache) and ``codes_bytes``
        (the quantized codes), the last four None until a search loaded the engine.
        """
        model = self._store.model()
        if model is None:
            return {"catalog": self.uri, "images": self._store.count(), "model": None}
        images, listings = self._engines.counts(model)
        out: dict[str, Any] = {
            "catalog": self.uri,
            "images": images,
            "model": {"name": model.name, "version": model.version, "dim": model.dim},
            "listings": listings,
        }
        out.update(self.model_status())
        out.update(self._engines.facts(self.settings))
        return out

    def coalescing(self) -> dict[str, int]:
        """How concurrent searches were served: ``batches`` (scans) and ``requests`` (calls of
        :meth:`search` / :meth:`search_batch`) so far; their ratio is the mean batch size."""
        co = self._engines.coalescer
        return {"batches": co.batches, "requests": co.requests}

    @property
    def engine_loaded(self) -> bool:
        """Whether this catalog object has built its vector cache (read from the store on the
        first search or other use of the vectors; ``stats``, listings and saved results never
        need it)."""
        return self._engines.loaded


#: A query vector whose L2 norm is below this cannot be normalized: ``search`` refuses it.
MIN_QUERY_NORM = 1e-6


def _normalize_queries(q: np.ndarray) -> np.ndarray:
    """``(n, d)`` finite float32 queries scaled to unit length.

    Raises:
        QueryError: a row's norm is below :data:`MIN_QUERY_NORM` (it has no direction: every
            score would be 0).
    """
    norms = np.linalg.norm(q.astype(np.float64), axis=1)
    zero = np.flatnonzero(norms < MIN_QUERY_NORM)
    if zero.size:
        which = "" if len(q) == 1 else f" (row {int(zero[0])} of {len(q)})"
        raise QueryError(
            f"query vector has zero length{which}: its norm {norms[zero[0]]:.3g} is below "
            f"{MIN_QUERY_NORM:g}, so it has no direction to search"
        )
    big = np.abs(q).max(axis=1) > 1e18  # the float32 norm would overflow to inf
    if big.any():
        q = q.astype(np.float64)
        q[big] /= np.abs(q[big]).max(axis=1, keepdims=True)
    return l2_normalize(q)


def _result(cache: VectorCache, raw: RawHits, spec: SearchSpec) -> SearchResult:
    """A :class:`SearchResult` (new ``query_id``) from an engine's rows and scores."""
    hits = [
        Hit(
            listing_id=cache.keys[row][0],
            image_id=cache.keys[row][1],
            score=float(score),
            rank=i + 1,
            n_images=int(cnt) if spec.grouped else None,
        )
        for i, (row, score, cnt) in enumerate(zip(raw.rows, raw.scores, raw.counts, strict=True))
    ]
    return SearchResult(uuid.uuid4().hex, hits)


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
        location: catalog folder (embedded SQLite store), or a ``postgresql://`` URL.
        extractor: for a new catalog, the extractor (default ``cnn``); for an existing one,
            checked against the stored model.
        device: ``cnn`` inference device: ``auto`` (GPU if present), ``cpu``, ``cuda``.
        create: create the catalog if missing.
        engine: search engine (:class:`~lookalike.types.EngineKind`), default ``auto``.

    Raises:
        NotFoundError: missing catalog and ``create`` is False.
        ModelMismatchError: ``extractor`` differs from the catalog's model.
    """
    return Catalog(
        open_store(location, create=create), extractor=extractor, device=device, engine=engine
    )
