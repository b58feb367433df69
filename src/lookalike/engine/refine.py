"""Exact answers from an approximate scan: candidates, exact re-scoring, and the proof.

This module owns :class:`Refiner`, the search loop shared by the compiled engines
(:class:`~lookalike.engine.fast.FastEngine` on the CPU, :class:`~lookalike.engine.gpu.TorchEngine`
on a torch device). Each engine supplies a :class:`Scanner` (what reads the codes); the refiner
turns its scan scores into exact answers. For each query:

1. **candidates**: the ``rerank * k`` best rows (or listings, after the per-listing aggregation
   kernel) by scan score;
2. **exact re-score**: candidates are scored again in float32 from the cache's float32 copy and
   ranked with the shared semantics (``ranking.py``, ties by key);
3. **proof**: every row outside the candidates has a scan score <= the lowest candidate's, so
   an exact score <= that + the prepared query's margin (``codes.py``). If that bound could
   reach the k-th exact score, the candidate set is widened to every row whose scan score is
   within the margin of it, and step 2 is repeated. So the answer is the exact answer, whatever
   the codes: recall@k is 1.0 by construction, and ``rerank`` only sets how often step 3 widens.

Threshold queries take every row with scan score > ``threshold - margin`` as candidates, so they
are exact too. Batches of image-level top-k queries ask the scanner for every query's
candidates in one pass (the CPU kernel reads the data once per 16 queries, with per-thread
reservoirs; over int8 codes it scores coarsely first and finely only where a row could still
become a candidate, see ``codes.py``), with the same proof per query.

The refiner counts the rows it re-scores (``rescored``, each row once per query) and the
queries (``queries``): with tight codes their ratio stays near ``rerank * k``.

Re-scoring, aggregation and top-k selection use the compiled kernels (``_kernels``).
"""

from __future__ import annotations

import math
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from ..types import Aggregation, GroupBy, RawHits, SearchSpec
from . import _kernels
from .cache import VectorCache
from .checks import check_listing_mask, check_queries, check_spec
from .codes import CodeTable, PreparedQuery
from .ranking import rank_images, rank_listings

#: Kernel number of each aggregation (defined by the kernels).
KERNEL_AGG: dict[Aggregation, int] = {
    Aggregation.MAX: _kernels.AGG_MAX,
    Aggregation.MEAN: _kernels.AGG_MEAN,
    Aggregation.SUM_TOP_N: _kernels.AGG_SUM_TOP_N,
}
#: Candidates kept by the scan for one query, so that the exactness check rarely has to widen
#: (only those that can matter are re-scored: see ``Refiner._rescore``).
MIN_CANDIDATES = 256
#: The same for queries of a batch, where widening costs a scan of its own, until the refiner
#: has seen how many candidates its queries need (:class:`CandidateFloor`).
MIN_CANDIDATES_BATCH = 1024
#: The fewest candidates a batch query keeps once learned, and the most.
MIN_CANDIDATES_LEARNED = 256
MAX_CANDIDATES_BATCH = 4096
#: Queries whose needed candidate counts :class:`CandidateFloor` looks back over.
NEEDED_WINDOW = 256
#: Candidates re-scored first, before the ones within the margin of the k-th score.
MIN_RESCORE = 32

Rows = npt.NDArray[np.int64]
Scores = npt.NDArray[np.float32]


def default_threads(threads: int | None = None) -> int:
    """Scan threads: ``threads``, else ``LOOKALIKE_THREADS``, else every core."""
    env = os.environ.get("LOOKALIKE_THREADS")
    return threads or (int(env) if env else (os.cpu_count() or 1))


@dataclass(frozen=True)
class RowFilter:
    """Rows a scan must exclude, in the kernels' form.

    Attributes:
        alive: ``(n_rows,) uint8`` live flag per row, or None when every row is live.
        lmask: ``(n_listings + 3,) uint8`` keep flag per listing number (3 bytes of padding
            for the kernels' 4-byte gathers), or None when no listing is filtered out.
    """

    alive: npt.NDArray[np.uint8] | None = None
    lmask: npt.NDArray[np.uint8] | None = None

    @classmethod
    def of(cls, cache: VectorCache, mask: npt.NDArray[np.bool_] | None) -> RowFilter:
        """The filter of ``cache``'s dead rows and of a checked ``(n_listings,)`` mask."""
        alive = cache.alive.view(np.uint8) if cache.n_alive < cache.n_rows else None
        lmask = None
        if mask is not None:
            lmask = np.zeros(len(mask) + 3, dtype=np.uint8)
            lmask[: len(mask)] = mask
        return cls(alive, lmask)


class Scratch:
    """Reusable per-thread buffers (fresh large arrays cost a page fault per 4 KiB)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, name: str, size: int, dtype: type[np.generic]) -> npt.NDArray[Any]:
        """A buffer of ``size`` items of ``dtype`` (contents undefined; valid until the next
        call with the same name on this thread)."""
        key = (name, np.dtype(dtype).str)
        bufs: dict[tuple[str, str], npt.NDArray[Any]] = self._local.__dict__.setdefault("b", {})
        buf = bufs.get(key)
        if buf is None or len(buf) < size:
            buf = np.empty(max(size, 1024), dtype=dtype)
            bufs[key] = buf
        return buf[:size]


class CandidateFloor:
    """How many candidates each query of a batch keeps, learned from the queries searched.

    A query's *needed* count is the number of rows whose scan score is within its margin of
    its k-th exact score: the proof needs all of them among the candidates, else the query
    widens with a dense scan of its own (~20 ms at 1M x 512 int8). Every candidate kept costs
    the batch scan reservoir work for every query (1M x 512 non-negative, batch of 64 on the
    AMX kernel: 66 ms at 256 candidates, 88 ms at 1,024), while crowded collections need many
    (100 Gaussian clusters at 1M rows: 1,024 candidates take 99 ms; 256 take 1.4 s, nearly
    every query widening). So the floor is 1.5 times the largest needed count of the last
    :data:`NEEDED_WINDOW` top-k queries, rounded up to a multiple of 128, within
    [:data:`MIN_CANDIDATES_LEARNED`, :data:`MAX_CANDIDATES_BATCH`]; before a quarter window is
    seen, :data:`MIN_CANDIDATES_BATCH`. The floor changes only speed: answers are exact at
    any floor. Thread-safe.
    """

    def __init__(self) -> None:
        self._needed: deque[int] = deque(maxlen=NEEDED_WINDOW)
        self._lock = threading.Lock()

    def record(self, needed: int) -> None:
        """Note one top-k query's needed candidate count (>= 0)."""
        with self._lock:
            self._needed.append(needed)

    def value(self) -> int:
        """The candidates a batch query should keep now (before clamping to the rows)."""
        with self._lock:
            if len(self._needed) < NEEDED_WINDOW // 4:
                return MIN_CANDIDATES_BATCH
            top = max(self._needed)
        want = 128 * math.ceil(1.5 * top / 128)
        return min(MAX_CANDIDATES_BATCH, max(MIN_CANDIDATES_LEARNED, want))


class Scanner(Protocol):
    """What reads the codes for a :class:`Refiner`: scan scores of every row.

    Attributes:
        table: the code table whose :meth:`~CodeTable.prepare` gives the base margin.
    """

    table: CodeTable

    def sync(self) -> None:
        """Bring the codes (or device copy) up to date with the cache."""
        ...

    def prepare(self, q: npt.NDArray[np.float32]) -> PreparedQuery:
        """The query ``(d,) float32`` in scan form, its margin covering this scanner's error."""
        ...

    def prepare_many(self, q: npt.NDArray[np.float32]) -> list[PreparedQuery]:
        """:meth:`prepare` of each query of ``(m, d) float32``, computed together."""
        ...

    def dense(self, prepared: PreparedQuery, rows: RowFilter) -> Scores:
        """``(n_rows,) float32`` scan scores, ``-inf`` where excluded (a scratch buffer: copy
        to keep)."""
        ...

    def dense_top(
        self, prepared: PreparedQuery, rows: RowFilter, kk: int
    ) -> tuple[Scores, Rows, Scores]:
        """:meth:`dense`, plus the ``kk`` best rows and their scan scores (unordered), picked
        during the same scan."""
        ...

    def candidates(
        self,
        q: npt.NDArray[np.float32],
        prepared: list[PreparedQuery],
        kk: int,
        rows: RowFilter,
        floors: npt.NDArray[np.float64] | None,
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """For each query of ``q`` ``(nq, d)`` the ``kk`` best rows by scan score (above
        ``floors[i]`` when given): rows ``(nq, kk) int64``, scores ``(nq, kk) float32`` and
        counts ``(nq,) int64`` (valid entries first in each row)."""
        ...


class Refiner:
    """The exact search loop over a :class:`Scanner` (module docstring).

    Args:
        cache: the vector cache.
        scanner: what produces scan scores.
        rerank: candidates per requested hit before the exactness check (>= 1).
        threads: threads of the aggregation kernel.

    Attributes:
        floor: the candidates a batch query keeps (:class:`CandidateFloor`).
        widened: how many searches needed the proof's widening step (for tests, benchmarks).
        rescored: rows whose exact score was computed, over all searches (each row once per
            query; ``rescored / queries`` is the benchmarks' "rows re-scored per query").
        queries: queries searched.
    """

    def __init__(
        self, cache: VectorCache, scanner: Scanner, rerank: int = 4, threads: int | None = None
    ) -> None:
        self.cache = cache
        self.scanner = scanner
        self.rerank = max(1, int(rerank))
        self.threads = default_threads(threads)
        self.scratch = Scratch()
        self.floor = CandidateFloor()
        self.widened = 0
        self.rescored = 0
        self.queries = 0
        self._stats_lock = threading.Lock()
        self._csr_version = -1
        self._csr: tuple[npt.NDArray[np.intp], npt.NDArray[np.int64]] | None = None
        self._seg_version = -1
        self._seg: tuple[npt.NDArray[np.int64], npt.NDArray[np.int32], bool] | None = None

    # ------------------------------------------------------------------ search

    def search(self, queries: npt.ArrayLike, spec: SearchSpec) -> list[RawHits]:
        """Search ``(nq, d) float32`` queries; one :class:`RawHits` per query (exact answers).

        Raises:
            QueryError: bad query (see :func:`check_queries`), spec or listing mask.
        """
        cache = self.cache
        check_spec(spec)
        q = check_queries(queries, cache.dim)
        mask = check_listing_mask(spec.listing_mask, len(cache.listings))
        self.scanner.sync()
        if cache.n_rows == 0:
            return [RawHits.empty() for _ in range(len(q))]
        rows = RowFilter.of(cache, mask)
        self._count(queries=len(q))
        if len(q) > 1 and spec.group_by is None and spec.k is not None:
            return self._batch(q, spec, rows)
        return [self._one(qv, spec, rows) for qv in q]

    def _one(self, qv: npt.NDArray[np.float32], spec: SearchSpec, rows: RowFilter) -> RawHits:
        prepared = self.scanner.prepare(qv)
        margin = prepared.margin
        if spec.group_by == GroupBy.LISTING:
            dense = self.scanner.dense(prepared, rows)
            return self._one_grouped(qv, spec, *self._aggregate(dense, spec), margin)
        if spec.k is None:  # threshold query: every row that can pass
            assert spec.threshold is not None  # check_spec: no limit needs a threshold
            dense = self.scanner.dense(prepared, rows)
            cand = np.flatnonzero(dense > np.float32(spec.threshold - margin))
            return self._image_hits(qv, spec)(cand)
        n = self.cache.n_rows
        kk = self._kk(spec.k, n)
        dense, cand, approx = self.scanner.dense_top(prepared, rows, kk)
        hits = self._image_hits(qv, spec)
        res = self._rescore(cand, approx, margin, spec, hits)
        full = len(cand) == kk and kk < n
        bound = float(approx.min()) + margin if len(approx) else -np.inf
        lower = self._must_widen(spec, res, full, bound)
        if lower is not None:
            self.widened += 1
            cand = np.flatnonzero(_at_least(dense, lower - margin))
            approx = dense[cand]
            res = self._rescore(cand, approx, margin, spec, hits)
        self._record_needed(res, approx, margin, spec.k)
        return res

    def _one_grouped(
        self,
        qv: npt.NDArray[np.float32],
        spec: SearchSpec,
        agg: Scores,
        count: npt.NDArray[np.int32],
        margin: float,
    ) -> RawHits:
        m = margin * (spec.top_n if spec.agg == Aggregation.SUM_TOP_N else 1)
        hits = self._listing_hits(qv, spec)
        if spec.k is None:
            assert spec.threshold is not None
            return hits(np.flatnonzero(agg > np.float32(spec.threshold - m)))
        present = int(np.count_nonzero(count))
        kk = self._kk(spec.k, present)
        listings, approx = self._top(agg, kk)
        res = self._rescore(listings, approx, m, spec, hits)
        full = len(listings) == kk and kk < present
        bound = float(approx.min()) + m if len(approx) else -np.inf
        lower = self._must_widen(spec, res, full, bound)
        if lower is not None:
            self.widened += 1
            listings = np.flatnonzero(_at_least(agg, lower - m))
            res = self._rescore(listings, agg[listings], m, spec, hits)
        return res

    def _batch(
        self, q: npt.NDArray[np.float32], spec: SearchSpec, rows: RowFilter
    ) -> list[RawHits]:
        n = self.cache.n_rows
        assert spec.k is not None
        prepared = self.scanner.prepare_many(q)
        # as many candidates as recent queries needed (CandidateFloor), fewer for short scans
        # (a widening is cheap there, while large reservoirs would not stay in cache)
        floor = min(self.floor.value(), max(64, n // 256))
        kk = self._kk(spec.k, n, floor)
        floors = None
        if spec.threshold is not None:  # only rows that can pass the threshold are candidates
            floors = np.array([spec.threshold - p.margin for p in prepared], dtype=np.float64)
        cand_rows, approx, counts = self.scanner.candidates(q, prepared, kk, rows, floors)
        out = []
        for i, qv in enumerate(q):
            cand, scan = cand_rows[i, : counts[i]], approx[i, : counts[i]]
            margin = prepared[i].margin
            res = self._rescore(cand, scan, margin, spec, self._image_hits(qv, spec))
            full = counts[i] == kk and kk < n
            bound = float(scan.min()) + margin if counts[i] else -np.inf
            if self._must_widen(spec, res, full, bound) is not None:
                self.widened += 1
                res = self._one(qv, spec, rows)  # widens through the dense path
            else:
                self._record_needed(res, scan, margin, spec.k)
            out.append(res)
        return out

    # ------------------------------------------------------------------ the proof

    def _kk(self, k: int, n: int, floor: int = MIN_CANDIDATES) -> int:
        return max(1, min(n, max(k * self.rerank, floor)))

    @staticmethod
    def _must_widen(spec: SearchSpec, res: RawHits, full: bool, bound: float) -> float | None:
        """The lower score bound to widen to, or None when the candidates provably suffice.

        ``bound``: the highest exact score a non-candidate can have.
        """
        if not full:
            return None
        t = spec.threshold
        if spec.k is not None and len(res.scores) >= spec.k:
            kth = float(res.scores[spec.k - 1])
            return kth if bound >= kth else None
        if t is None:  # fewer than k hits from a full candidate set: defensive, all rows
            return -np.inf
        return t if bound > t else None

    def _record_needed(self, res: RawHits, approx: Scores, margin: float, k: int) -> None:
        """Note how many of a proven top-k answer's candidates (scan scores ``approx``) were
        within ``margin`` of its k-th exact score (:class:`CandidateFloor`)."""
        if len(res.scores) >= k:
            lower = np.float32(float(res.scores[k - 1]) - margin)
            self.floor.record(int(np.count_nonzero(approx >= lower)))

    def _rescore(
        self,
        cand: npt.NDArray[np.int64],
        approx: Scores,
        margin: float,
        spec: SearchSpec,
        exact_hits: Callable[[npt.NDArray[np.int64]], RawHits],
    ) -> RawHits:
        """Exact hits from the candidates that can matter, best scan score first.

        The first ``max(rerank * k, MIN_RESCORE)`` candidates are re-scored; a further one is
        re-scored only if its scan score is within ``margin`` of the k-th exact score found so
        far (or of the threshold): below that, its exact score cannot reach the answer.
        ``exact_hits`` re-scores candidates (rows, or listings) and ranks them."""
        order = np.argsort(-approx, kind="stable")
        cand, approx = cand[order], approx[order]
        first = min(len(cand), max((spec.k or 0) * self.rerank, MIN_RESCORE))
        res = exact_hits(cand[:first])
        if first < len(cand):
            if spec.k is not None and len(res.scores) >= spec.k:
                lower = float(res.scores[spec.k - 1]) - margin
            elif spec.threshold is not None:
                lower = spec.threshold - margin
            else:
                lower = -np.inf
            # approx is sorted descending: the candidates at or above `lower` form a prefix
            take = first + int(np.count_nonzero(approx[first:] >= np.float32(lower)))
            if take > first:
                res = exact_hits(cand[:take])
        return res

    def _count(self, queries: int = 0, rescored: int = 0) -> None:
        with self._stats_lock:
            self.queries += queries
            self.rescored += rescored

    def _image_hits(
        self, qv: npt.NDArray[np.float32], spec: SearchSpec
    ) -> Callable[[npt.NDArray[np.int64]], RawHits]:
        """Ranked exact hits of candidate rows. ``_rescore`` passes a growing prefix of one
        ordering: rows scored by the previous call are not scored again."""
        done = _Scored()

        def hits(rows: npt.NDArray[np.int64]) -> RawHits:
            scores = done.extend(rows, rows, lambda new: self._scores_of(new, qv))
            return rank_images(self.cache, rows, scores, spec)

        return hits

    def _listing_hits(
        self, qv: npt.NDArray[np.float32], spec: SearchSpec
    ) -> Callable[[npt.NDArray[np.int64]], RawHits]:
        """Ranked exact hits of candidate listings (their live rows re-scored; a growing
        prefix of listings re-scores only the rows of the new ones)."""
        done = _Scored()

        def hits(listings: npt.NDArray[np.int64]) -> RawHits:
            known = done.known(listings)
            before = done.rows if known else done.rows[:0]
            rows = np.concatenate([before, self.listing_rows(listings[known:])])
            scores = done.extend(listings, rows, lambda new: self._scores_of(new, qv))
            return rank_listings(self.cache, rows, scores, spec)

        return hits

    def _scores_of(self, rows: npt.NDArray[np.int64], qv: npt.NDArray[np.float32]) -> Scores:
        self._count(rescored=len(rows))
        return self.exact_scores(rows, qv)

    # ------------------------------------------------------------------ kernels

    def exact_scores(self, rows: npt.ArrayLike, q: npt.NDArray[np.float32]) -> Scores:
        """``(m,) float32`` exact scores of cache ``rows`` ``(m,)`` with the ``(d,) float32``
        query, from the cache's float32 copy (read in place, no gather)."""
        r = np.ascontiguousarray(rows, dtype=np.int64)
        out = np.empty(len(r), dtype=np.float32)
        cache = self.cache
        _kernels.dot_rows(cache.vectors, cache.n_rows, cache.dim, r, q, out)
        return out

    def listing_rows(self, listings: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Live rows ``(m,) int64`` of the given listing numbers (a CSR index of rows by
        listing, rebuilt when the cache changes; rows are clustered, so the stable sort is
        nearly linear)."""
        cache = self.cache
        if len(listings) > 4096:
            sel = np.zeros(len(cache.listings), dtype=bool)
            sel[listings] = True
            rows = np.flatnonzero(sel[cache.row_listing])
        else:
            if self._csr_version != cache.version or self._csr is None:
                order = np.argsort(cache.row_listing, kind="stable")
                counts = np.bincount(cache.row_listing, minlength=len(cache.listings))
                self._csr = (order, np.r_[0, np.cumsum(counts)])
                self._csr_version = cache.version
            order, starts = self._csr
            first, lengths = starts[listings], starts[listings + 1] - starts[listings]
            offsets = np.cumsum(lengths) - lengths  # vectorised concatenation of the slices
            within = np.arange(int(lengths.sum())) - np.repeat(offsets, lengths)
            rows = order[np.repeat(first, lengths) + within]
        if cache.n_alive < cache.n_rows:
            rows = rows[cache.alive[rows]]
        return rows.astype(np.int64, copy=False)

    def _segments(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int32], bool]:
        """Runs of consecutive rows of one listing: starts ``(S+1,) int64``, listing numbers
        ``(S,) int32``, and whether every listing is a single run (then they are reduced in
        parallel)."""
        cache = self.cache
        if self._seg_version != cache.version or self._seg is None:
            lnum = cache.row_listing
            change = np.flatnonzero(lnum[1:] != lnum[:-1]) + 1
            starts = np.concatenate([[0], change, [len(lnum)]]).astype(np.int64)
            seg_listing = np.ascontiguousarray(lnum[starts[:-1]]) if len(lnum) else lnum[:0]
            unique = len(np.unique(seg_listing)) == len(seg_listing)
            self._seg = (starts, seg_listing, unique)
            self._seg_version = cache.version
        return self._seg

    def _aggregate(self, dense: Scores, spec: SearchSpec) -> tuple[Scores, npt.NDArray[np.int32]]:
        """Per-listing aggregate ``(L,) float32`` (-inf where nothing scored) and scored-row
        count ``(L,) int32`` of dense scan scores."""
        n_listings = len(self.cache.listings)
        agg = self.scratch.get("agg", n_listings, np.float32)
        count = self.scratch.get("count", n_listings, np.int32)
        best = self.scratch.get("best", n_listings, np.int64)
        starts, seg_listing, unique = self._segments()
        _kernels.segments_agg(
            dense,
            starts,
            seg_listing,
            n_listings,
            KERNEL_AGG[Aggregation(spec.agg)],
            spec.top_n,
            int(unique),
            agg,
            count,
            best,
            self.threads,
        )
        return agg, count

    @staticmethod
    def _top(values: Scores, kk: int) -> tuple[npt.NDArray[np.int64], Scores]:
        """Indices and values of the ``kk`` largest finite entries (unordered)."""
        rows = np.empty(kk, dtype=np.int64)
        vals = np.empty(kk, dtype=np.float32)
        count = _kernels.topk_values(values, kk, rows, vals)
        return rows[:count], vals[:count]


class _Scored:
    """Exact scores already computed for a prefix of keys (rows, or listings) of one query."""

    def __init__(self) -> None:
        self.keys = np.zeros(0, dtype=np.int64)
        self.rows = np.zeros(0, dtype=np.int64)
        self.scores = np.zeros(0, dtype=np.float32)

    def known(self, keys: npt.NDArray[np.int64]) -> int:
        """How many leading ``keys`` were scored before (0 unless they extend the last ones)."""
        m = len(self.keys)
        return m if len(keys) >= m and np.array_equal(keys[:m], self.keys) else 0

    def extend(
        self,
        keys: npt.NDArray[np.int64],
        rows: npt.NDArray[np.int64],
        score: Callable[[npt.NDArray[np.int64]], Scores],
    ) -> Scores:
        """Scores ``(len(rows),) float32`` of ``rows`` (those of ``keys``, the known ones
        first), computing only the rows not scored before."""
        have = len(self.rows) if self.known(keys) else 0
        scores = np.concatenate([self.scores[:have], score(rows[have:])])
        self.keys, self.rows, self.scores = keys, rows, scores
        return scores


def _at_least(values: Scores, lower: float) -> npt.NDArray[np.bool_]:
    """``values >= lower`` for finite ``lower``; every scored entry (not -inf) otherwise."""
    if np.isfinite(lower):
        return values >= np.float32(lower)
    return values > -np.inf
