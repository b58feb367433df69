"""The catalog's engines: one vector cache synced from the store, the exact engine over it, and
the ANN engines built or loaded for it; which one answers a search (``index=``).

:class:`EngineSet` is owned by one :class:`~lookalike.catalog.Catalog` and used under its lock.
It keeps the in-RAM :class:`~lookalike.engine.VectorCache` in step with the store through the
store's change sequence (new rows appended, deleted or replaced rows masked, listing
attributes refreshed), so writes by other processes appear in the next search.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..engine import SearchEngine, VectorCache, engine_name, make_engine
from ..engine.ann import AnnEngine, AnnIndex, AnnParams
from ..errors import LookalikeError, QueryError
from ..store import Store
from ..types import CodeKind, IndexKind, choices
from .validate import catalog_name

#: ``index="auto"`` searches a built ANN index once an exact scan would read more than this
#: many bytes of codes (1.5 GB: about 50 ms at the 30 GB/s the int8 scan reaches on the build
#: machine, see ``benchmarks/scan.py`` and ``benchmarks/ann.py``); below it, exact search.
ANN_AUTO_BYTES = 1.5e9


class EngineSet:
    """The vector cache, the exact engine and the ANN engines of one catalog.

    Args:
        store: the catalog's store (read only here: changes, listings).
        engine_kind: exact engine (:class:`~lookalike.types.EngineKind`).
        ann_folder: where ANN indexes are saved (``<catalog>/ann``).

    Not thread-safe on its own: the catalog calls it under its lock.
    """

    def __init__(self, store: Store, engine_kind: str, ann_folder: Path) -> None:
        self.store = store
        self.engine_kind = engine_kind
        self.ann_folder = ann_folder
        self._cache: VectorCache | None = None
        self._exact: SearchEngine | None = None
        self._ann: dict[str, AnnEngine] = {}
        self.loads = 0

    @property
    def loaded(self) -> bool:
        """Whether the vector cache has been built in this process (commands that need no
        vectors, such as ``stats``, never build it)."""
        return self._cache is not None

    def facts(self, settings: dict[str, str]) -> dict[str, Any]:
        """The engine's part of ``Catalog.stats``, read without loading anything: ``engine``
        and ``codes`` (the loaded engine's, else what would be built), ``engine_loaded``, and
        when loaded ``cache_rows``, ``cache_bytes`` (float32 cache) and ``codes_bytes``
        (None when not loaded)."""
        exact, cache = self._exact, self._cache
        if exact is None or cache is None:
            name = engine_name(self.engine_kind)
            return {
                "engine": name,
                "codes": settings["codes"] if name == "fast" else "float32",
                "engine_loaded": False,
                "cache_rows": None,
                "cache_bytes": None,
                "codes_bytes": None,
            }
        return {
            "engine": exact.name,
            "codes": str(exact.code_kind),
            "engine_loaded": True,
            "cache_rows": cache.n_rows,
            "cache_bytes": cache.nbytes(),
            "codes_bytes": exact.nbytes(),
        }

    def reset(self) -> None:
        """Drop the exact engine (settings changed); it is rebuilt on the next :meth:`sync`."""
        self._exact = None

    def sync(self, settings: dict[str, str]) -> VectorCache:
        """Bring the cache up to date with the store (incremental) and return it.

        Args:
            settings: the catalog's settings (``codes``, ``rerank``) for a new exact engine.

        Raises:
            QueryError: the catalog is empty (no model yet).
        """
        model = self.store.model()
        if model is None:
            raise QueryError(
                f"catalog {catalog_name(self.store.uri)!r} is empty; index some images first"
            )
        if self._cache is None or self._cache.dim != model.dim:
            self._cache = VectorCache(model.dim)
            self.loads += 1
            self._exact = None
            self._ann.clear()
        if self._exact is None:
            self._exact = make_engine(
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

    @property
    def exact(self) -> SearchEngine:
        """The exact engine (after :meth:`sync`)."""
        if self._exact is None:
            raise LookalikeError("engine used before the catalog synced it")
        return self._exact

    def ann(self, kind: str) -> AnnEngine | None:
        """The ANN engine of ``kind`` (loaded from ``ann_folder`` on first use), or None when
        no such index was built.

        Raises:
            LookalikeError: the saved index has another dimension than the collection.
        """
        eng = self._ann.get(kind)
        if eng is None:
            ann = AnnIndex.load(self.ann_folder, kind)
            if ann is None:
                return None
            cache = self.exact.cache
            if ann.dim != cache.dim:
                raise LookalikeError(f"{self.ann_folder}/{kind}.faiss has d={ann.dim}; rebuild it")
            eng = self._ann[kind] = AnnEngine(cache, ann)
        return eng

    def build(self, params: AnnParams) -> AnnIndex:
        """Train and fill an ANN index over the (synced) cache, save it and use it."""
        cache = self.exact.cache
        ann = AnnIndex.build(cache, params)
        ann.save(self.ann_folder)
        self._ann[params.kind] = AnnEngine(cache, ann)
        return ann

    def choose(self, choice: str) -> SearchEngine:
        """The engine that answers a search with ``index=choice`` (after :meth:`sync`).

        ``exact``: the exact engine; an ANN kind: that index (an error if not built);
        ``auto``: an ANN index, if one is built and an exact scan would read at least
        :data:`ANN_AUTO_BYTES` of codes, else the exact engine.

        Raises:
            QueryError: unknown choice, or the ANN index asked for is not built.
        """
        if choice not in choices(IndexKind):
            raise QueryError(
                f"unknown index {choice!r}; use one of {', '.join(choices(IndexKind))}"
            )
        exact = self.exact
        if choice == IndexKind.EXACT:
            return exact
        if choice != IndexKind.AUTO:
            eng = self.ann(choice)
            if eng is None:
                raise QueryError(
                    f"no {choice} index in catalog {catalog_name(self.store.uri)!r}; build one"
                    f" with `lookalike ann build --kind {choice}`"
                )
            return eng
        cache = exact.cache
        scan_bytes = cache.n_alive * cache.dim * CodeKind(exact.code_kind).itemsize
        if scan_bytes >= ANN_AUTO_BYTES:
            for kind in IndexKind.ann():
                eng = self.ann(kind)
                if eng is not None:
                    return eng
        return exact

    def save_dirty(self) -> None:
        """Save the ANN indexes that followed new writes since they were built or loaded."""
        for eng in self._ann.values():
            if eng.ann.dirty:
                eng.ann.save(self.ann_folder)
