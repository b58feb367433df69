"""Approximate nearest-neighbour search with faiss, behind the same ``search`` call.

This module owns :class:`AnnParams` (index parameters and their defaults), :class:`AnnIndex`
(a faiss index over the cache's live rows: build, persist, follow the cache) and
:class:`AnnEngine` (a :class:`~lookalike.engine.protocol.SearchEngine` whose candidates come
from an index; ``exact`` is False).

Index kinds (inner product, on the L2-normalized vectors):

========= ============================ =========================================================
kind      faiss factory                 what
========= ============================ =========================================================
``ivf``   ``IVF{nlist},Flat``          k-means cells, the ``nprobe`` nearest cells scanned exactly
``ivfpq`` ``IVF{nlist},PQ{m}x8``       cells + product quantization (Jégou et al., TPAMI 2011)
``hnsw``  ``HNSW{M},Flat``             navigable small-world graph (Malkov & Yashunin, TPAMI 2018)
========= ============================ =========================================================

Defaults: ``nlist = min(4 * sqrt(n), n / 39)`` (faiss wiki, "Guidelines to choose an index"; faiss
wants 39 training points per cell), ``nprobe =
nlist / 8``, ``m = min(64, d / 4)`` sub-quantizers of 8 bits, ``M = 32``,
``efConstruction = 80``, ``efSearch = 256``; candidates fetched per hit (``overfetch``): 4, or
16 for ``ivfpq``, whose codes are coarse. (Measured in ``benchmarks/ann.py``.)

Ids are stable 63-bit hashes of ``(listing_id, image_id)`` (``cache.key_hash``), so an index
saved with the catalog stays valid across processes: on load it is reconciled with the cache
(rows added since are added, deleted ones removed), and afterwards it follows the cache
incrementally (appended rows added, dead rows removed: ``remove_ids`` for IVF; an exclusion
list applied during the graph search for HNSW, which cannot remove).

Candidates from the index (``k * overfetch`` of them) are re-scored exactly in float32 and
then filtered, thresholded and grouped with the shared semantics (``ranking.py``), so scores are
exact and only *which* rows are found is approximate. ``recall_at_k`` measures that against
exact search.

faiss is imported lazily (only ANN needs it) and handled as ``Any``: its generated SWIG stubs
do not describe downcast index types or the search-parameter classes.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import LookalikeError
from ..files import atomic_path, atomic_write
from ..types import CodeKind, IndexKind, RawHits, SearchSpec
from .cache import VectorCache
from .checks import check_listing_mask, check_queries, check_spec
from .ranking import rank

#: The approximate index kinds (``IndexKind.ann()`` as plain strings): ivf, ivfpq, hnsw.
ANN_KINDS: tuple[str, ...] = tuple(k.value for k in IndexKind.ann())
#: Rows sampled to train IVF / PQ: at least this many, and at least ``TRAIN_PER_CELL`` per
#: IVF cell (faiss warns below 39 points per centroid: ``faiss/Clustering.cpp``).
TRAIN_SAMPLE = 100_000
TRAIN_PER_CELL = 40


def _faiss() -> Any:
    """The faiss module, untyped (see the module docstring)."""
    import faiss

    return faiss


@dataclass
class AnnParams:
    """Index parameters; 0 means "choose from the data" (see the module docstring)."""

    kind: str = "hnsw"
    nlist: int = 0
    nprobe: int = 0
    pq_m: int = 0
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 256
    overfetch: int = 0

    def resolved(self, n: int, d: int) -> AnnParams:
        """Parameters with the data-dependent defaults filled in, for ``n`` vectors of
        dimension ``d``.

        Raises:
            LookalikeError: unknown index kind.
        """
        p = AnnParams(**asdict(self))
        if p.kind not in ANN_KINDS:
            raise LookalikeError(f"unknown index {p.kind!r}; use one of {', '.join(ANN_KINDS)}")
        if p.nlist <= 0:  # 4 sqrt(n), but at least 39 training points per cell (faiss' advice)
            p.nlist = max(1, min(65536, int(4 * math.sqrt(max(n, 1))), n // 39))
        if p.nprobe <= 0:
            p.nprobe = max(1, p.nlist // 8)
        if p.pq_m <= 0:
            p.pq_m = max(1, min(64, d // 4))
            while d % p.pq_m:
                p.pq_m -= 1
        if p.overfetch <= 0:
            p.overfetch = 16 if p.kind == "ivfpq" else 4
        return p

    def factory(self, d: int) -> str:
        """The faiss ``index_factory`` string (resolved parameters; ``d`` unused)."""
        if self.kind == "ivf":
            return f"IVF{self.nlist},Flat"
        if self.kind == "ivfpq":
            return f"IVF{self.nlist},PQ{self.pq_m}x8"
        return f"HNSW{self.hnsw_m},Flat"


@dataclass
class AnnIndex:
    """A faiss index over a cache's live rows, ids = stable key hashes.

    Build with :meth:`build`, or :meth:`load` a saved one; :meth:`sync` follows the cache.
    """

    params: AnnParams
    dim: int
    index: Any
    layout: int = -1
    n_synced: int = 0
    alive_synced: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    excluded: set[int] = field(default_factory=set)  # HNSW: dead ids still in the graph
    build_seconds: float = 0.0
    dirty: bool = False  # changed since built or loaded: save it
    model: str = ""  # tag of the model of the vectors it was built over ("": not told)

    # ------------------------------------------------------------------ build / persist

    @classmethod
    def build(cls, cache: VectorCache, params: AnnParams, threads: int | None = None) -> AnnIndex:
        """Train (IVF, PQ) and fill an index with every live row of ``cache``.

        Raises:
            LookalikeError: too few rows to train the requested index.
        """
        faiss = _faiss()
        t0 = time.perf_counter()
        live = np.flatnonzero(cache.alive)
        p = params.resolved(len(live), cache.dim)
        if p.kind != "hnsw" and len(live) < p.nlist * 4:
            raise LookalikeError(
                f"{len(live)} vectors are too few to train {p.nlist} IVF cells; "
                "use --nlist smaller, or exact search"
            )
        if threads:
            faiss.omp_set_num_threads(threads)
        base = faiss.index_factory(cache.dim, p.factory(cache.dim), faiss.METRIC_INNER_PRODUCT)
        if p.kind == "hnsw":
            base.hnsw.efConstruction = p.ef_construction
        else:
            if p.kind == "ivfpq":
                base.do_polysemous_training = False  # only for polysemous search, unused
            rng = np.random.default_rng(0)
            want = max(TRAIN_SAMPLE, TRAIN_PER_CELL * p.nlist)
            sample = live if len(live) <= want else rng.choice(live, want, False)
            base.train(np.ascontiguousarray(cache.vectors[np.sort(sample)]))
        ann = cls(params=p, dim=cache.dim, index=faiss.IndexIDMap2(base), model=cache.model)
        ann._reset_to(cache)
        ann.build_seconds = time.perf_counter() - t0
        return ann

    def _reset_to(self, cache: VectorCache) -> None:
        """Make the index hold exactly the cache's live rows."""
        present = self._present_ids()
        wanted = cache.hashes[cache.alive]
        stale = np.setdiff1d(present, wanted, assume_unique=False)
        missing_rows = np.flatnonzero(cache.alive)[~np.isin(wanted, present)]
        self._remove(stale)
        self._add(cache, missing_rows)
        self.layout = cache.layout
        self.n_synced = cache.n_rows
        self.alive_synced = cache.alive.copy()

    def _present_ids(self) -> np.ndarray:
        faiss = _faiss()
        ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        if self.excluded:
            ids = ids[~np.isin(ids, np.fromiter(self.excluded, np.int64))]
        return ids

    def _add(self, cache: VectorCache, rows: np.ndarray) -> None:
        if len(rows):
            self.dirty = True
            vecs = np.ascontiguousarray(cache.vectors[rows])
            self.index.add_with_ids(vecs, np.ascontiguousarray(cache.hashes[rows]))

    def _remove(self, ids: np.ndarray) -> None:
        if not len(ids):
            return
        self.dirty = True
        if self.params.kind == "hnsw":
            self.excluded.update(int(i) for i in ids)
        else:
            self.index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64))

    def sync(self, cache: VectorCache) -> None:
        """Follow the cache: add appended live rows, remove rows that died since last time.

        After a compaction (rows renumbered) the index is reconciled by id instead."""
        if self.layout != cache.layout or cache.n_rows < self.n_synced:
            self._reset_to(cache)
            return
        old = self.n_synced
        died = np.flatnonzero(self.alive_synced & ~cache.alive[:old])
        self._remove(cache.hashes[died])
        new_rows = np.arange(old, cache.n_rows)
        self._add(cache, new_rows[cache.alive[old:]])
        self.n_synced = cache.n_rows
        self.alive_synced = cache.alive.copy()

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``<kind>.faiss`` and ``<kind>.json`` into ``folder`` (atomically)."""
        faiss = _faiss()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{self.params.kind}.faiss"
        with atomic_path(target) as tmp:
            faiss.write_index(self.index, str(tmp))
        meta = {
            "params": asdict(self.params),
            "dim": self.dim,
            "model": self.model,
            "excluded": sorted(self.excluded),
            "build_seconds": self.build_seconds,
            "saved_at": time.time(),
        }
        atomic_write(folder / f"{self.params.kind}.json", json.dumps(meta))
        self.dirty = False
        return target

    @classmethod
    def load(cls, folder: str | os.PathLike[str], kind: str) -> AnnIndex | None:
        """Read a saved index, or None if there is none of that kind."""
        faiss = _faiss()
        folder = Path(folder)
        path, meta_path = folder / f"{kind}.faiss", folder / f"{kind}.json"
        if not path.exists() or not meta_path.exists():
            return None
        meta = json.loads(meta_path.read_text())
        ann = cls(
            params=AnnParams(**meta["params"]),
            dim=int(meta["dim"]),
            index=faiss.read_index(str(path)),
            model=str(meta.get("model", "")),
        )
        ann.excluded = {int(i) for i in meta.get("excluded", [])}
        ann.build_seconds = float(meta.get("build_seconds", 0.0))
        return ann

    # ------------------------------------------------------------------ search

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        """Ids ``(nq, k) int64`` of approximate neighbours (-1 where fewer were found)."""
        faiss = _faiss()
        p = self.params
        sel = None
        if self.excluded:
            sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.fromiter(self.excluded, np.int64)))
        if p.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(p.ef_search, k))
            if sel is not None:
                params.sel = sel
        else:
            params = faiss.SearchParametersIVF(nprobe=p.nprobe)
        _, ids = self.index.search(
            np.ascontiguousarray(queries, dtype=np.float32), k, params=params
        )
        return ids

    @property
    def ntotal(self) -> int:
        """Vectors held (HNSW: including excluded ones)."""
        return int(self.index.ntotal)

    def nbytes(self) -> int:
        """Approximate bytes held by the index: stored vectors or PQ codes, ids (id map and
        its reverse hash map, about 24 bytes an id), IVF centroids and PQ codebooks, HNSW
        level-0 links (``2 M`` int32 per vector; upper levels add about ``1/M`` of that)."""
        faiss = _faiss()
        base = faiss.downcast_index(self.index.index)
        n, d, p = self.ntotal, self.dim, self.params
        total = n * 24
        if p.kind == "hnsw":
            total += n * (d * 4 + 2 * p.hnsw_m * 4)
        else:
            total += n * int(base.code_size) + p.nlist * d * 4
            if p.kind == "ivfpq":
                total += 256 * d * 4  # m sub-quantizers x 256 centroids x d / m floats
        return int(total)


class AnnEngine:
    """Search through an :class:`AnnIndex`: candidates from the index, scored exactly;
    implements :class:`~lookalike.engine.protocol.SearchEngine` with ``exact`` False.

    Filters, thresholds and grouping apply to the candidates; when a filter leaves fewer than
    ``k`` hits, the candidate count is raised (up to 64x) before giving up, unless a
    threshold already cut the candidates (the lowest scores at or below it: more candidates,
    which come further away, cannot pass it).

    Args:
        cache: the vector cache.
        ann: the index (followed with :meth:`AnnIndex.sync` on each search).

    Attributes:
        ann: the :class:`AnnIndex`.
        code_kind: ``float32``: candidates are re-scored from the cache's float32 vectors
            (the index's own storage is described by ``ann.params.kind``).
    """

    name = "ann"
    exact = False
    code_kind = CodeKind.FLOAT32

    def __init__(self, cache: VectorCache, ann: AnnIndex) -> None:
        self.cache = cache
        self.ann = ann
        self._id_version = -1
        self._sorted_ids: np.ndarray | None = None
        self._sorted_rows: np.ndarray | None = None

    def nbytes(self) -> int:
        """Approximate bytes held by the index (see :meth:`AnnIndex.nbytes`)."""
        return self.ann.nbytes()

    def _rows_of(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Live cache rows of index ids (ids of rows gone since, and -1, are dropped)."""
        cache = self.cache
        if self._id_version != cache.version:
            live = np.flatnonzero(cache.alive)
            order = np.argsort(cache.hashes[live])
            self._sorted_ids = cache.hashes[live][order]
            self._sorted_rows = live[order]
            self._id_version = cache.version
        assert self._sorted_ids is not None and self._sorted_rows is not None
        ids = ids[ids >= 0]
        pos = np.searchsorted(self._sorted_ids, ids)
        pos = np.minimum(pos, len(self._sorted_ids) - 1)
        found = self._sorted_ids[pos] == ids
        return self._sorted_rows[pos[found]]

    def search(self, queries: npt.ArrayLike, spec: SearchSpec) -> list[RawHits]:
        """Approximate search: ``(nq, d)`` queries -> one :class:`RawHits` each (exact scores).

        Raises:
            QueryError: bad query, spec or listing mask.
        """
        cache = self.cache
        check_spec(spec)
        q = check_queries(queries, cache.dim)
        mask = check_listing_mask(spec.listing_mask, len(cache.listings))
        self.ann.sync(cache)
        if cache.n_alive == 0:
            return [RawHits.empty() for _ in q]
        want = spec.k if spec.k is not None else 100
        fetch = max(want * self.ann.params.overfetch, 16)
        out: list[RawHits | None] = [None] * len(q)
        todo = list(range(len(q)))
        while todo:
            ids = self.ann.search(q[todo], min(fetch, cache.n_alive))
            still = []
            for j, qi in enumerate(todo):
                rows = np.unique(self._rows_of(ids[j]))
                if mask is not None:
                    rows = rows[mask[cache.row_listing[rows]]]
                scores = cache.vectors[rows] @ q[qi]
                res = rank(cache, rows, scores, spec)
                short = spec.k is not None and len(res.rows) < spec.k
                # Candidates come nearest first: once one scores at or below the threshold,
                # fetching more cannot add a hit above it.
                exhausted = spec.threshold is not None and bool(
                    len(scores) and scores.min() <= spec.threshold
                )
                if short and not exhausted and fetch < 64 * want and fetch < cache.n_alive:
                    still.append(qi)
                out[qi] = res
            todo = still
            fetch *= 4
        return [r for r in out if r is not None]
