"""The catalog's engines: one vector cache synced from the store, immutable snapshots of it, the
exact engine and the ANN engines over the newest snapshot; which one answers a search
(``index=``); and the coalescing of concurrent searches into batches.

:class:`EngineSet` is owned by one :class:`~lookalike.catalog.Catalog`. Two locks, never held
together and neither for long except the second:

* the **sync lock** guards the live :class:`~lookalike.engine.VectorCache`, which follows the
  store's change sequence (new rows appended, deleted or replaced rows masked, listing
  attributes refreshed), so writes by other processes appear in the next search. After every
  sync that changed something it publishes an immutable snapshot (:meth:`VectorCache.snapshot`,
  O(1), copy-on-write);
* the **scan lock** guards the engines: before each scan the newest snapshot is adopted by the
  cache object the engines are bound to, so derived structures (codes, ANN indexes) follow it
  incrementally, and a scan reads one consistent snapshot while new writes are applied to the
  live cache and published beside it.

Searches through :meth:`EngineSet.search` go through a
:class:`~lookalike.engine.coalesce.Coalescer`: concurrent ones are scanned as one batch per
group of compatible options (``k``, ``threshold``, ``group_by``, ``agg``, ``top_n``,
``where``, ``index``), each request keeping its own. The catalog-wide lock is not held.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..devices import ram_bytes
from ..engine import (
    Expr,
    NumpyEngine,
    SearchEngine,
    VectorCache,
    engine_name,
    make_engine,
    parse_where,
)
from ..engine.ann import AnnEngine, AnnIndex, AnnParams
from ..engine.coalesce import BatchPolicy, Coalescer
from ..engine.codes import CodeTable
from ..errors import LookalikeError, QueryError
from ..store import Store
from ..types import CodeKind, IndexKind, ModelInfo, RawHits, SearchSpec, choices
from .cachesource import CacheSource
from .validate import catalog_name

log = logging.getLogger(__name__)

#: A new exact engine over more values (rows x d) than this, and at most :func:`warm_limit`,
#: builds its codes in the background while the numpy engine answers (int8 codes of 200k x 512
#: take about 1.5 s on 2 cores).
WARM_VALUES = 2**26


def warm_limit() -> int:
    """The most float32 values a numpy scan may read while codes are built: a quarter of the
    machine's RAM (past it the mapped vectors would not stay in the page cache)."""
    ram = ram_bytes()
    return 2**28 if ram is None else ram // 16


#: Catalog settings and their defaults (``Catalog.configure``, ``lookalike config``).
DEFAULT_SETTINGS: dict[str, str] = {"codes": "int8", "rerank": "4", "index": "auto"}

#: ``index="auto"`` searches a built ANN index once an exact scan would read more than this
#: many bytes of codes (1.5 GB: about 50 ms at the 30 GB/s the int8 scan reaches on the build
#: machine, see ``benchmarks/scan.py`` and ``benchmarks/ann.py``); below it, exact search.
ANN_AUTO_BYTES = 1.5e9


@dataclass(frozen=True)
class SearchRequest:
    """One call of ``Catalog.search`` / ``search_batch`` on its way to a batch scan.

    Attributes:
        queries: ``(nq, d) float32`` checked (and normalized) query vectors.
        spec: the options; its ``listing_mask`` is unset (the batch sets it from ``where``).
        where: the filter's text (parsed already, so it is well-formed), or None.
        index: ``IndexKind`` value, or None for the catalog's setting.
    """

    queries: np.ndarray
    spec: SearchSpec
    where: str | None
    index: str | None

    def group(self) -> tuple[Any, ...]:
        """Requests with equal groups are scanned together."""
        s = self.spec
        return (s.k, s.threshold, s.group_by, s.agg, s.top_n, self.where, self.index)


@dataclass(frozen=True)
class SearchAnswer:
    """The hits of one :class:`SearchRequest` and the snapshot their rows refer to."""

    hits: list[RawHits]
    snapshot: VectorCache


class EngineSet:
    """The vector cache, its snapshots, the exact engine and the ANN engines of one catalog
    (module docstring). Thread-safe.

    Args:
        store: the catalog's store (read only here: changes, listings, settings).
        engine_kind: exact engine (:class:`~lookalike.types.EngineKind`).
        ann_folder: where ANN indexes are saved (``<catalog>/ann``).
        files_folder: where the engine files are kept (``<catalog>/engine``,
            :mod:`lookalike.engine.mapped`); None: not kept.

    Attributes:
        loads: how many times the vector cache was built (1 per process, unless the
            collection's dimension changed).
        source: where the cache is built from (the engine files or the store).
        coalescer: serves :meth:`search` (its ``batches`` and ``requests`` count them).
    """

    def __init__(
        self,
        store: Store,
        engine_kind: str,
        ann_folder: Path,
        files_folder: Path | None = None,
    ) -> None:
        self.store = store
        self.engine_kind = engine_kind
        self.ann_folder = ann_folder
        self.source = CacheSource(store, files_folder)
        self._attributes = False
        self._sync_lock = threading.Lock()
        self._scan_lock = threading.RLock()
        self._cache: VectorCache | None = None  # the live cache (sync lock)
        self._snapshot: VectorCache | None = None  # newest published snapshot
        self._bound: VectorCache | None = None  # what the exact engine reads (scan lock)
        self._ann_bound: VectorCache | None = None  # what the ANN engines read
        self._bound_snap: VectorCache | None = None  # the snapshot both hold
        self._exact: SearchEngine | None = None
        self._code_kind = CodeKind.FLOAT32  # what the exact engine (once built) scans
        self._warming: threading.Thread | None = None
        self._generation = 0  # bumped when the exact engine is dropped
        self._no_warm = False
        self._ann: dict[str, AnnEngine] = {}
        self._built: dict[str, Any] | None = None  # facts of the built engine
        self.loads = 0
        self.coalescer: Coalescer[SearchRequest, SearchAnswer] = Coalescer(self._run_batch)
        self._policies: dict[tuple[Any, ...], BatchPolicy] = {}

    # ------------------------------------------------------------------ state

    @property
    def loaded(self) -> bool:
        """Whether the vector cache has been built in this process (commands that need no
        vectors, such as ``stats``, never build it)."""
        return self._cache is not None

    def facts(self, settings: dict[str, str]) -> dict[str, Any]:
        """The engine's part of ``Catalog.stats``, read without loading anything and without
        waiting for a running scan: ``engine`` and ``codes`` (the built engine's, else what
        would be built), ``engine_loaded`` (the vector cache is built), ``cache_source``
        (``files``: mapped from the engine files; ``store``: read from the store),
        ``cache_rows`` and ``cache_bytes`` (the newest snapshot's float32 cache) and
        ``codes_bytes`` (after the last scan); None for what is not built."""
        snap, built = self._snapshot, self._built
        if built is None:
            name = engine_name(self.engine_kind)
            built = {
                "engine": name,
                "codes": settings["codes"] if name == "fast" else "float32",
                "codes_bytes": None,
            }
        return {
            "engine": built["engine"],
            "codes": built["codes"],
            "engine_loaded": self.loaded,
            "cache_source": self.source.kind() if self.loaded else None,
            "codes_source": self.source.codes_kind() if self.loaded else None,
            "cache_rows": snap.n_rows if snap is not None else None,
            "cache_bytes": snap.nbytes() if snap is not None else None,
            "codes_bytes": built["codes_bytes"],
        }

    def _note_built(self) -> None:
        """Record the built engine's facts for :meth:`facts` (caller holds the scan lock)."""
        exact = self._exact
        if exact is not None:
            self._built = {
                "engine": exact.name,
                "codes": str(exact.code_kind),
                "codes_bytes": exact.nbytes(),
            }

    def counts(self, model: ModelInfo) -> tuple[int, int]:
        """``(images, listings with an image)``: from the engine files' header when no write
        came since it was written, else counted by the store."""
        fresh = self.source.counts(model)
        if fresh is not None:
            return fresh
        return self.store.count(), self.store.count_listings()

    def reset(self) -> None:
        """Drop the exact engine (settings changed); it is rebuilt before the next scan."""
        with self._scan_lock:
            self._exact = None
            self._built = None
            self._generation += 1

    def snapshot(self, attributes: bool = True) -> VectorCache:
        """Bring the live cache up to date with the store (incremental) and return the newest
        immutable snapshot of it (read it freely: later writes never change it).

        The first call in a process maps the engine files when they are valid, else reads every
        row from the store and writes the files (:class:`~.cachesource.CacheSource`).

        Args:
            attributes: also bring the listing attributes up to date (loaded on first need:
                a search without ``where`` never reads them).

        Raises:
            QueryError: the catalog is empty (no model yet).
        """
        model = self.store.model()
        if model is None:
            raise QueryError(
                f"catalog {catalog_name(self.store.uri)!r} is empty; index some images first"
            )
        with self._sync_lock:
            cache = self._cache
            changes = None
            if cache is not None and cache.model == model.tag:
                changes = self.store.changes_since(cache.seq)
            if cache is None or changes is None or changes.model not in (None, model):
                # none yet, or the catalog holds another model (a reindex swapped): reload
                if cache is not None or self._bound is not None:
                    with self._scan_lock:  # a new cache: engines and indexes start over
                        self._bound = None
                        self._generation += 1
                cache = self._cache = self.source.load(model, self._drop)
                self._snapshot = None
                self._attributes = False
                self.loads += 1
            else:
                cache.apply(changes)
            if attributes or self._attributes:
                seq, listings = self.store.listings_since(cache.listing_seq)
                cache.update_listings(seq, listings)
                self._attributes = True
            self.source.save_if_due(cache)
            snap = self._snapshot
            if snap is None or (snap.version, snap.listings.version) != (
                cache.version,
                cache.listings.version,
            ):
                snap = self._snapshot = cache.snapshot()
            return snap

    def save_files(self) -> None:
        """Write what the live cache applied since the engine files were last written (on
        close: the next process maps them)."""
        with self._sync_lock:
            if self._cache is not None:
                self.source.save_if_changed(self._cache)
        self._save_codes(self._exact)

    def _drop(self, cache: VectorCache) -> None:
        """Forget ``cache`` (its files proved corrupt): the next sync builds a new one."""
        with self._sync_lock:
            if self._cache is cache:
                self._cache = None

    def current(self) -> VectorCache:
        """The newest published snapshot, synced first only if there is none yet (for checks
        that need the dimension, not the newest rows).

        Raises:
            QueryError: the catalog is empty.
        """
        return self._snapshot or self.snapshot(attributes=False)

    def _bind(self, snap: VectorCache, settings: dict[str, str], wait: bool = False) -> None:
        """Make the engines read ``snap`` (caller holds the scan lock).

        A new exact engine over more than :data:`WARM_VALUES` values builds its codes in the
        background (:meth:`_warm`) unless ``wait``: meanwhile the numpy engine answers,
        exactly, from the same snapshot (a cold process answers at once)."""
        self._bound_snap = snap
        if self._bound is None or self._bound.dim != snap.dim:
            self._bound, self._ann_bound = VectorCache(snap.dim), VectorCache(snap.dim)
            self._exact = None
            self._ann.clear()
            self._generation += 1
        self._bound.adopt(snap)
        assert self._ann_bound is not None
        self._ann_bound.adopt(snap)
        if self._exact is not None:
            return
        engine = make_engine(
            self._bound, self.engine_kind, codes=settings["codes"], rerank=int(settings["rerank"])
        )
        self._code_kind = CodeKind(engine.code_kind)
        table = getattr(engine, "table", None)
        if isinstance(table, CodeTable) and self.source.restore_codes(table, self._bound.layout):
            self._exact = engine  # codes saved with the engine files: no build
            return
        values = snap.n_rows * snap.dim
        if wait or engine.name == "numpy" or not WARM_VALUES <= values <= warm_limit():
            self._exact = engine
            return
        warm_bound = self._bound  # the new engine keeps reading this object
        self._bound = VectorCache(snap.dim)
        self._bound.adopt(snap)
        self._exact = NumpyEngine(self._bound)
        self._warming = threading.Thread(  # started after this scan: it gets the cores first
            target=self._warm,
            args=(engine, warm_bound, self._generation),
            name="lookalike-engine-warm",
            daemon=True,
        )

    def _warm(self, engine: SearchEngine, bound: VectorCache, generation: int) -> None:
        """Build ``engine``'s codes (or device copy) over the snapshot ``bound`` holds, then
        make it the exact engine, unless the settings changed meanwhile."""
        try:
            engine.nbytes()  # brings the derived structures up to date with its cache
        except Exception as exc:  # e.g. values past the float16 range: the next bind raises
            log.warning("engine of %s not built in the background: %s", self.store.uri, exc)
            with self._scan_lock:
                if generation == self._generation:
                    self._exact = None
                    self._no_warm = True
                self._warming = None
            return
        with self._scan_lock:
            self._warming = None
            if generation != self._generation or self._bound_snap is None:
                return
            bound.adopt(self._bound_snap)
            self._bound = bound
            self._exact = engine
            self._note_built()
        self._save_codes(engine)

    def _save_codes(self, engine: SearchEngine | None) -> None:
        """Save ``engine``'s codes beside the engine files (:meth:`CacheSource.save_codes`)."""
        table = getattr(engine, "table", None)
        if isinstance(table, CodeTable):
            self.source.save_codes(table, self._scan_lock)

    def start_background(self) -> None:
        """Start the background work a build left for after the first answer: the codes of a
        new exact engine (:meth:`_bind`) and the check of mapped vectors
        (:class:`~.cachesource.CacheSource`)."""
        thread = self._warming
        if thread is not None and thread.ident is None:
            with contextlib.suppress(RuntimeError):  # started by another thread meanwhile
                thread.start()
        self.source.start_background()

    def await_engine(self, timeout: float | None = None) -> bool:
        """Wait until the exact engine built in the background (if any) is in use; returns
        False on timeout."""
        thread = self._warming
        if thread is not None:
            self.start_background()
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def settings(self) -> dict[str, str]:
        """The catalog's search settings (stored values over :data:`DEFAULT_SETTINGS`)."""
        stored = self.store.settings()
        return {key: stored.get(key, default) for key, default in DEFAULT_SETTINGS.items()}

    # ------------------------------------------------------------------ engines

    def engine(self, choice: str | None = None) -> SearchEngine:
        """The engine that answers a search with ``index=choice`` (default: the setting),
        reading the newest snapshot.

        The engine is shared with :meth:`search`: use it from one thread at a time, as the
        analytics do, with no concurrent searches; concurrent callers use :meth:`search`.

        Raises:
            QueryError: the catalog is empty, unknown choice, or the ANN index is not built.
        """
        self.await_engine()
        snap = self.snapshot(attributes=False)
        settings = self.settings()
        with self._scan_lock:
            self._bind(snap, settings, wait=True)
            engine = self._choose(choice or settings["index"])
            self._note_built()
        self.start_background()
        return engine

    @property
    def exact(self) -> SearchEngine:
        """The exact engine (after :meth:`engine` or a search)."""
        if self._exact is None:
            raise LookalikeError("engine used before the catalog synced it")
        return self._exact

    def ann(self, kind: str) -> AnnEngine | None:
        """The ANN engine of ``kind`` (loaded from ``ann_folder`` on first use), or None when
        no such index was built (after :meth:`engine`).

        Raises:
            LookalikeError: the saved index has another dimension than the collection.
        """
        with self._scan_lock:
            eng = self._ann.get(kind)
            if eng is None:
                ann = AnnIndex.load(self.ann_folder, kind)
                if ann is None:
                    return None
                cache = self._ann_bound
                if cache is None:
                    raise LookalikeError("engine used before the catalog synced it")
                if ann.model and ann.model != cache.model:  # another model's: never mixed
                    log.warning("%s index built for %s, not %s", kind, ann.model, cache.model)
                    return None
                if ann.dim != cache.dim:
                    raise LookalikeError(
                        f"{self.ann_folder}/{kind}.faiss has d={ann.dim}; rebuild it"
                    )
                eng = self._ann[kind] = AnnEngine(cache, ann)
            return eng

    def build(self, params: AnnParams) -> AnnIndex:
        """Train and fill an ANN index over the newest snapshot, save it and use it."""
        self.await_engine()
        snap = self.snapshot(attributes=False)
        settings = self.settings()
        with self._scan_lock:
            self._bind(snap, settings, wait=True)
            cache = self._ann_bound
            assert cache is not None
            ann = AnnIndex.build(cache, params)
            ann.save(self.ann_folder)
            self._ann[params.kind] = AnnEngine(cache, ann)
            self._note_built()
            return ann

    def _choose(self, choice: str) -> SearchEngine:
        """The engine that answers a search with ``index=choice`` (caller holds the scan lock,
        engines bound).

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
        scan_bytes = cache.n_alive * cache.dim * self._code_kind.itemsize  # once built
        if scan_bytes >= ANN_AUTO_BYTES:
            for kind in IndexKind.ann():
                eng = self.ann(kind)
                if eng is not None:
                    return eng
        return exact

    def save_dirty(self) -> None:
        """Save the ANN indexes that followed new writes since they were built or loaded."""
        with self._scan_lock:
            for eng in self._ann.values():
                if eng.ann.dirty:
                    eng.ann.save(self.ann_folder)

    # ------------------------------------------------------------------ search

    def search(self, request: SearchRequest) -> SearchAnswer:
        """Answer one request, scanned in one batch with the concurrent ones (module
        docstring); it sees every write committed before the call.

        Raises:
            QueryError: unknown attribute in ``where``, unknown index or index not built, the
                catalog is empty.
        """
        return self.coalescer.submit(request)

    def _scan(self, engine: SearchEngine, queries: np.ndarray, spec: SearchSpec) -> list[RawHits]:
        """``engine.search`` of ``(n, d)`` queries: as one batch, one by one when that measured
        cheaper per query, or one alone and the rest as a batch to measure a single scan
        (:class:`~lookalike.engine.coalesce.BatchPolicy`)."""
        policy = self._policies.setdefault(_policy_key(spec), BatchPolicy())
        n = len(queries)
        alone = 0 if n == 1 else policy.singles(n)
        t0 = time.perf_counter()
        hits = [engine.search(q, spec)[0] for q in queries[:alone]]
        t1 = time.perf_counter()
        if alone:
            policy.record(False, alone, t1 - t0)
        if alone < n:
            hits += engine.search(queries[alone:], spec)
            policy.record(n - alone > 1, n - alone, time.perf_counter() - t1)
        return hits

    def _run_batch(self, requests: list[SearchRequest]) -> list[SearchAnswer | BaseException]:
        """Serve a batch: sync once, then one engine call per group of compatible requests."""
        settings = self.settings()
        snap = self.snapshot(attributes=any(req.where for req in requests))
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(req.group(), []).append(i)
        out: list[SearchAnswer | BaseException] = [QueryError("not served")] * len(requests)
        with self._scan_lock:
            self._bind(snap, settings, wait=self._no_warm)
            for members in groups.values():
                first = requests[members[0]]
                try:
                    engine = self._choose(first.index or settings["index"])
                    spec = first.spec
                    if first.where is not None:
                        spec = _with_mask(spec, where_mask(snap, first.where))
                    queries = [requests[i].queries for i in members]
                    stacked = np.concatenate(queries) if len(queries) > 1 else queries[0]
                    hits = self._scan(engine, stacked, spec)
                except Exception as exc:
                    for i in members:
                        out[i] = exc
                    continue
                start = 0
                for i, q in zip(members, queries, strict=True):
                    out[i] = SearchAnswer(hits[start : start + len(q)], snap)
                    start += len(q)
            self._note_built()
        self.start_background()
        return out


def _policy_key(spec: SearchSpec) -> tuple[Any, ...]:
    return (spec.group_by, spec.k is None)


def _with_mask(spec: SearchSpec, mask: np.ndarray) -> SearchSpec:
    return SearchSpec(
        k=spec.k,
        threshold=spec.threshold,
        group_by=spec.group_by,
        agg=spec.agg,
        top_n=spec.top_n,
        listing_mask=mask,
    )


@functools.lru_cache(maxsize=256)
def parsed_where(where: str) -> Expr:
    """:func:`~lookalike.engine.parse_where`, remembered for the next query (expressions are
    immutable).

    Raises:
        QueryError: a malformed expression.
    """
    return parse_where(where)


def where_mask(cache: VectorCache, where: str) -> np.ndarray:
    """``(n_listings,) bool`` mask of the listings of ``cache`` that pass ``where`` (cached per
    expression and listing version).

    Raises:
        QueryError: a malformed expression, or an attribute no listing has (catches typos).
    """
    expr = parsed_where(where)
    listings = cache.listings
    known = listings.names()
    unknown = sorted(expr.names() - known)
    if unknown:
        raise QueryError(
            f"where: unknown listing attribute(s) {', '.join(unknown)}; known: "
            f"{', '.join(sorted(known))}"
        )
    return listings.where_mask(where, expr)
