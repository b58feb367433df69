"""The fast exact engine: a compiled scan over compact codes, then exact re-scoring with proof.

For each query the C kernel (``_kernels.c``) scores every row from the codes (int8, float16 or
float32) on all cores, with deleted rows and filtered-out listings excluded during the scan.
Then:

1. **candidates**: the ``rerank * k`` best rows (or listings, after the per-listing aggregation
   kernel) by scan score;
2. **exact re-score**: candidates are scored again in float32 from the cache's float32 copy and
   ranked with :class:`~lookalike.engine.exact.ExactEngine`'s semantics (ties by key);
3. **proof**: every row outside the candidates has a scan score <= the lowest candidate's, so
   an exact score <= that + the code table's margin (``codes.py``). If that bound could reach
   the k-th exact score, the candidate set is widened to every row whose scan score is within
   the margin of it, and step 2 is repeated. So the answer is the exact answer, whatever the
   codes: recall@k is 1.0 by construction, and ``rerank`` only sets how often step 3 widens.

Threshold queries take every row with scan score > ``threshold - margin`` as candidates, so they
are exact too. Batches of image-level top-k queries use a fused kernel (data read once for 8
queries at a time, per-thread heaps), with the same proof per query.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import numpy as np

from ..types import RawHits, SearchSpec
from . import _kernels  # type: ignore[attr-defined]
from .cache import VectorCache
from .codes import CodeTable
from .exact import ExactEngine, check_queries, check_spec

AGG_CODES = {"max": 0, "mean": 1, "sum-top-n": 2}
#: Candidates kept by the scan for one query, so that the exactness check rarely has to widen
#: (only those that can matter are re-scored: see ``FastEngine._rescore``).
MIN_CANDIDATES = 256
#: The same for queries of a batch, where widening costs a scan of its own.
MIN_CANDIDATES_BATCH = 1024
#: Candidates re-scored first, before the ones within the margin of the k-th score.
MIN_RESCORE = 32
#: Float32 batches are scored by BLAS in row blocks of about this many bytes of scores.
GEMM_BLOCK_BYTES = 64 * 2**20


class FastEngine(ExactEngine):
    """Exact search through the compiled kernels over int8 / float16 / float32 codes.

    Args:
        cache: the vector cache.
        codes: ``"int8"`` (default), ``"float16"`` or ``"float32"``.
        rerank: candidates per requested hit before the exactness check (>= 1).
        threads: scan threads (default: every core; ``LOOKALIKE_THREADS`` overrides).
    """

    name = "fast"

    def __init__(
        self, cache: VectorCache, codes: str = "int8", rerank: int = 4, threads: int | None = None
    ) -> None:
        super().__init__(cache)
        self.table = CodeTable(codes, cache.dim)
        self.rerank = max(1, int(rerank))
        env = os.environ.get("LOOKALIKE_THREADS")
        self.threads = threads or (int(env) if env else (os.cpu_count() or 1))
        self._csr_version = -1
        self._csr: tuple[np.ndarray, np.ndarray] | None = None
        self._seg_version = -1
        self._seg: tuple[np.ndarray, np.ndarray, bool] | None = None
        self._local = threading.local()
        self.widened = 0  # how many searches needed the proof's widening step (for benchmarks)

    @property
    def codes(self) -> str:
        """The code kind scanned."""
        return self.table.kind_name

    def nbytes(self) -> int:
        """Bytes of codes held beyond the cache's float32 copy (encodes pending rows first)."""
        self.table.sync(self.cache)
        return self.table.nbytes()

    # ------------------------------------------------------------------ plumbing

    def _filters(self, spec: SearchSpec) -> tuple[np.ndarray | None, np.ndarray | None]:
        cache = self.cache
        alive = cache.alive.view(np.uint8) if cache.n_alive < cache.n_rows else None
        lmask = None
        if spec.listing_mask is not None:  # padded by 3 bytes for the kernels' 4-byte gathers
            lmask = np.zeros(len(spec.listing_mask) + 3, dtype=np.uint8)
            lmask[: len(spec.listing_mask)] = spec.listing_mask
        return alive, lmask

    def _scratch(self, name: str, size: int, dtype: type) -> np.ndarray:
        """A reusable per-thread buffer (fresh large arrays cost a page fault per 4 KiB)."""
        key = (name, np.dtype(dtype).str)
        buf = self._local.__dict__.get(key)
        if buf is None or len(buf) < size:
            buf = np.empty(max(size, 1024), dtype=dtype)
            self._local.__dict__[key] = buf
        return buf[:size]

    def _dense(self, pq, alive, lmask, kk: int = 0):
        """Scan scores of every row, -inf where excluded (a scratch buffer: copy to keep).

        With ``kk`` > 0, also the ``kk`` best rows and their scan scores (unordered), selected
        during the same scan: returns ``(dense, rows, scores)``."""
        cache = self.cache
        out = self._scratch("dense", cache.n_rows, np.float32)
        rows = np.empty(kk, dtype=np.int64) if kk else None
        vals = np.empty(kk, dtype=np.float32) if kk else None
        count = _kernels.scores(
            self.table.kind,
            self.table.data,
            cache.n_rows,
            cache.dim,
            pq.buf,
            pq.scale,
            pq.offset,
            cache.codes if lmask is not None else None,
            lmask,
            alive,
            len(cache.listings),
            out,
            self.threads,
            kk,
            rows,
            vals,
        )
        return (out, rows[:count], vals[:count]) if kk else out

    def _segments(self) -> tuple[np.ndarray, np.ndarray, bool]:
        """Runs of consecutive rows of one listing: starts ``(S+1,) int64``, codes ``(S,)``,
        and whether every listing is a single run (then they are reduced in parallel)."""
        cache = self.cache
        if self._seg_version != cache.version or self._seg is None:
            codes = cache.codes
            change = np.flatnonzero(codes[1:] != codes[:-1]) + 1
            starts = np.concatenate([[0], change, [len(codes)]]).astype(np.int64)
            seg_codes = np.ascontiguousarray(codes[starts[:-1]]) if len(codes) else codes[:0]
            unique = len(np.unique(seg_codes)) == len(seg_codes)
            self._seg = (starts, seg_codes, unique)
            self._seg_version = cache.version
        return self._seg

    def _aggregate(self, dense: np.ndarray, spec: SearchSpec) -> tuple[np.ndarray, np.ndarray]:
        """Per-listing aggregate and scored-row count of dense scan scores."""
        n_listings = len(self.cache.listings)
        agg = self._scratch("agg", n_listings, np.float32)
        count = self._scratch("count", n_listings, np.int32)
        best = self._scratch("best", n_listings, np.int64)
        starts, seg_codes, unique = self._segments()
        _kernels.segments_agg(
            dense,
            starts,
            seg_codes,
            n_listings,
            AGG_CODES[spec.agg],
            spec.top_n,
            int(unique),
            agg,
            count,
            best,
            self.threads,
        )
        return agg, count

    def _exact(self, rows: np.ndarray, q: np.ndarray) -> np.ndarray:
        """Float32 scores of ``rows`` from the cache's float32 copy (read in place)."""
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        out = np.empty(len(rows), dtype=np.float32)
        cache = self.cache
        _kernels.dot_rows(cache.vectors, cache.n_rows, cache.dim, rows, q, out)
        return out

    def _listing_rows(self, listings: np.ndarray) -> np.ndarray:
        """Live rows of the given listing codes (a CSR index of rows by listing, rebuilt when
        the cache changes; rows are clustered, so the stable sort is nearly linear)."""
        cache = self.cache
        if len(listings) > 4096:
            sel = np.zeros(len(cache.listings), dtype=bool)
            sel[listings] = True
            rows = np.flatnonzero(sel[cache.codes])
        else:
            if self._csr_version != cache.version or self._csr is None:
                order = np.argsort(cache.codes, kind="stable")
                counts = np.bincount(cache.codes, minlength=len(cache.listings))
                self._csr = (order, np.r_[0, np.cumsum(counts)])
                self._csr_version = cache.version
            order, starts = self._csr
            first, lengths = starts[listings], starts[listings + 1] - starts[listings]
            offsets = np.cumsum(lengths) - lengths  # vectorised concatenation of the slices
            within = np.arange(int(lengths.sum())) - np.repeat(offsets, lengths)
            rows = order[np.repeat(first, lengths) + within]
        if cache.n_alive < cache.n_rows:
            rows = rows[cache.alive[rows]]
        return rows

    def _top(self, values: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices and values of the ``kk`` largest finite entries (unordered)."""
        rows = np.empty(kk, dtype=np.int64)
        vals = np.empty(kk, dtype=np.float32)
        count = _kernels.topk_values(values, kk, rows, vals)
        return rows[:count], vals[:count]

    @staticmethod
    def _at_least(values: np.ndarray, lower: float) -> np.ndarray:
        """``values >= lower`` for finite ``lower``; every scored entry (not -inf) otherwise."""
        if np.isfinite(lower):
            return values >= np.float32(lower)
        return values > -np.inf

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

    # ------------------------------------------------------------------ search

    def search(self, queries: np.ndarray, spec: SearchSpec) -> list[RawHits]:
        """Search ``(nq, d) float32`` queries; one :class:`RawHits` per query (exact answers).

        Raises:
            QueryError: bad query (see :func:`check_queries`) or spec.
        """
        cache = self.cache
        check_spec(spec)
        q = check_queries(queries, cache.dim)
        if spec.listing_mask is not None and len(spec.listing_mask) != len(cache.listings):
            return super().search(q, spec)  # raises the shape error
        self.table.sync(cache)
        if cache.n_rows == 0:
            return [self._empty() for _ in range(len(q))]
        alive, lmask = self._filters(spec)
        if len(q) > 1 and spec.group_by is None and spec.k is not None:
            return self._batch(q, spec, alive, lmask)
        return [self._one(qv, spec, alive, lmask) for qv in q]

    @staticmethod
    def _empty() -> RawHits:
        return RawHits(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64))

    def _rescore(
        self,
        cand: np.ndarray,
        approx: np.ndarray,
        margin: float,
        spec: SearchSpec,
        exact_hits: Callable[[np.ndarray], RawHits],
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

    def _image_hits(self, qv: np.ndarray, spec: SearchSpec) -> Callable[[np.ndarray], RawHits]:
        return lambda rows: self._images(rows, self._exact(rows, qv), spec)

    def _listing_hits(self, qv: np.ndarray, spec: SearchSpec) -> Callable[[np.ndarray], RawHits]:
        def hits(listings: np.ndarray) -> RawHits:
            rows = self._listing_rows(listings)
            return self._grouped(rows, self._exact(rows, qv), spec)

        return hits

    def _one(self, qv: np.ndarray, spec: SearchSpec, alive, lmask) -> RawHits:
        pq = self.table.prepare(qv)
        if spec.group_by == "listing":
            dense = self._dense(pq, alive, lmask)
            return self._one_grouped(qv, spec, *self._aggregate(dense, spec), pq.margin)
        if spec.k is None:  # threshold query: every row that can pass
            dense = self._dense(pq, alive, lmask)
            cand = np.flatnonzero(dense > np.float32(spec.threshold - pq.margin))
            return self._images(cand, self._exact(cand, qv), spec)
        kk = self._kk(spec.k, cache_rows := self.cache.n_rows)
        dense, cand, approx = self._dense(pq, alive, lmask, kk)
        res = self._rescore(cand, approx, pq.margin, spec, self._image_hits(qv, spec))
        full = len(cand) == kk and kk < cache_rows
        lower = self._must_widen(
            spec, res, full, float(approx.min()) + pq.margin if len(approx) else -np.inf
        )
        if lower is not None:
            self.widened += 1
            cand = np.flatnonzero(self._at_least(dense, lower - pq.margin))
            res = self._rescore(cand, dense[cand], pq.margin, spec, self._image_hits(qv, spec))
        return res

    def _one_grouped(
        self, qv: np.ndarray, spec: SearchSpec, agg: np.ndarray, count: np.ndarray, margin: float
    ) -> RawHits:
        m = margin * (spec.top_n if spec.agg == "sum-top-n" else 1)
        hits = self._listing_hits(qv, spec)
        if spec.k is None:
            return hits(np.flatnonzero(agg > np.float32(spec.threshold - m)))
        present = int(np.count_nonzero(count))
        kk = self._kk(spec.k, present)
        listings, approx = self._top(agg, kk)
        res = self._rescore(listings, approx, m, spec, hits)
        full = len(listings) == kk and kk < present
        lower = self._must_widen(
            spec, res, full, float(approx.min()) + m if len(approx) else -np.inf
        )
        if lower is not None:
            self.widened += 1
            listings = np.flatnonzero(self._at_least(agg, lower - m))
            res = self._rescore(listings, agg[listings], m, spec, hits)
        return res

    def _batch(self, q: np.ndarray, spec: SearchSpec, alive, lmask) -> list[RawHits]:
        cache = self.cache
        assert spec.k is not None
        prepared = [self.table.prepare(qv) for qv in q]
        # at most 1024 candidates a query, fewer for short scans (a widening is cheap there,
        # while large reservoirs for many queries would not stay in cache)
        floor = min(MIN_CANDIDATES_BATCH, max(64, cache.n_rows // 256))
        kk = self._kk(spec.k, cache.n_rows, floor)
        floors = None
        if spec.threshold is not None:  # only rows that can pass the threshold are candidates
            floors = np.array([spec.threshold - p.margin for p in prepared], dtype=np.float64)
        rows, approx, counts = self._batch_candidates(q, prepared, kk, alive, lmask, floors)
        out = []
        for i, qv in enumerate(q):
            cand, scan = rows[i, : counts[i]], approx[i, : counts[i]]
            res = self._rescore(cand, scan, prepared[i].margin, spec, self._image_hits(qv, spec))
            full = counts[i] == kk and kk < cache.n_rows
            bound = float(scan.min()) + prepared[i].margin if counts[i] else -np.inf
            if self._must_widen(spec, res, full, bound) is not None:
                self.widened += 1
                res = self._one(qv, spec, alive, lmask)  # widens through the dense path
            out.append(res)
        return out

    def _batch_candidates(self, q: np.ndarray, prepared, kk: int, alive, lmask, floors=None):
        """For each query the ``kk`` best rows by scan score (above ``floors[i]`` if given):
        ``rows (nq, kk)``, ``scores``, ``counts (nq,)`` (valid entries first)."""
        if self.table.kind_name == "float32":
            rows, vals, counts = self._batch_gemm(q, kk, alive, lmask)
            if floors is not None:  # rows are sorted best first: cut below the floor
                counts = np.minimum(counts, (vals > floors[:, None].astype(np.float32)).sum(1))
            return rows, vals, counts
        cache = self.cache
        nq = len(q)
        bufs = np.ascontiguousarray(np.stack([p.buf for p in prepared]))
        scales = np.array([p.scale for p in prepared], dtype=np.float64)
        offsets = np.array([p.offset for p in prepared], dtype=np.float64)
        rows = np.empty((nq, kk), dtype=np.int64)
        approx = np.empty((nq, kk), dtype=np.float32)
        counts = np.empty(nq, dtype=np.int64)
        _kernels.topk_batch(
            self.table.kind,
            self.table.data,
            cache.n_rows,
            cache.dim,
            bufs,
            scales,
            offsets,
            nq,
            cache.codes if lmask is not None else None,
            lmask,
            alive,
            len(cache.listings),
            kk,
            rows,
            approx,
            counts,
            self.threads,
            floors,
        )
        return rows, approx, counts

    def _batch_gemm(self, q: np.ndarray, kk: int, alive, lmask):
        """Float32 batches are compute-bound: BLAS sgemm on row blocks, then per-query top-kk."""
        cache = self.cache
        nq, n = len(q), cache.n_rows
        block = max(4096, GEMM_BLOCK_BYTES // (4 * nq))
        best_rows = np.zeros((nq, 0), dtype=np.int64)
        best_vals = np.zeros((nq, 0), dtype=np.float32)
        keep = None
        if lmask is not None or alive is not None:
            keep = np.ones(n, dtype=bool) if alive is None else alive.view(bool).copy()
            if lmask is not None:
                keep &= lmask[: len(cache.listings)].view(bool)[cache.codes]
        for a in range(0, n, block):
            s = q @ cache.vectors[a : a + block].T  # (nq, b)
            if keep is not None:
                s[:, ~keep[a : a + block]] = -np.inf
            m = min(kk, s.shape[1])
            part = np.argpartition(s, s.shape[1] - m, axis=1)[:, s.shape[1] - m :]
            vals = np.take_along_axis(s, part, axis=1)
            best_rows = np.concatenate([best_rows, part + a], axis=1)
            best_vals = np.concatenate([best_vals, vals], axis=1)
            if best_rows.shape[1] > kk:
                top = np.argpartition(best_vals, best_vals.shape[1] - kk, axis=1)[:, -kk:]
                best_rows = np.take_along_axis(best_rows, top, axis=1)
                best_vals = np.take_along_axis(best_vals, top, axis=1)
        counts = np.isfinite(best_vals).sum(axis=1).astype(np.int64)
        order = np.argsort(-best_vals, axis=1, kind="stable")  # finite first
        return (
            np.take_along_axis(best_rows, order, axis=1),
            np.take_along_axis(best_vals, order, axis=1),
            counts,
        )
