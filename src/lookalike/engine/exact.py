"""Exact search over the vector cache with numpy: every live vector is scored.

Search semantics (shared by every engine, so they can be checked against this one):

* **score** = inner product of the (L2-normalized) query with each vector, float32.
* **image-level**: the ``k`` highest scores; with ``threshold`` only rows with ``score >
  threshold`` (and all of them when ``k`` is None).
* **group aggregation** (``group_by="listing"``): per listing, over its live (and filtered)
  images, ``max`` (default), ``mean``, or ``sum-top-n`` (sum of the ``top_n`` highest); one hit
  per listing, carrying the listing's best image. ``threshold`` then applies to the aggregate.
* **filters**: a boolean mask over listing codes, applied before ranking (a filtered-out row
  never takes a top-k slot).
* **order**: score descending, ties broken by ``(listing_id, image_id)`` ascending, so every
  engine returns the same list.
"""

from __future__ import annotations

import numpy as np

from ..errors import QueryError
from ..types import Aggregation, RawHits, SearchSpec, choices
from .cache import VectorCache

AGGREGATIONS: tuple[str, ...] = choices(Aggregation)

#: Score blocks are sized so that one ``(rows, queries)`` block stays under this many bytes.
BLOCK_BYTES = 256 * 1024 * 1024


def check_spec(spec: SearchSpec) -> SearchSpec:
    """Return ``spec`` if it is consistent.

    Raises:
        QueryError: ``k < 1``, no limit without a threshold, an unknown aggregation or grouping,
            ``top_n < 1``, or a non-finite threshold (:meth:`SearchSpec.problem`).
    """
    problem = spec.problem()
    if problem is not None:
        raise QueryError(problem)
    return spec


def check_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    """Validate query vectors and return them as ``(nq, d) float32`` C-contiguous.

    Raises:
        QueryError: wrong dimension, wrong rank, or a NaN/inf value.
    """
    q = np.asarray(queries)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2:
        raise QueryError(f"query must be (d,) or (n, d); got shape {np.shape(queries)}")
    if q.shape[1] != dim:
        raise QueryError(f"query has d={q.shape[1]}, the collection has d={dim}")
    if not np.issubdtype(q.dtype, np.number):
        raise QueryError(f"query must be numeric, got dtype {q.dtype}")
    q = np.ascontiguousarray(q, dtype=np.float32)
    if not np.isfinite(q).all():
        raise QueryError("query vector contains NaN or infinity")
    return q


class ExactEngine:
    """Exact inner-product search with numpy (BLAS ``sgemm``/``sgemv``) over a :class:`VectorCache`.

    This is the reference implementation of the search semantics (module docstring).
    """

    name = "numpy"

    def __init__(self, cache: VectorCache) -> None:
        self.cache = cache

    def search(self, queries: np.ndarray, spec: SearchSpec) -> list[RawHits]:
        """Search ``(nq, d) float32`` queries; one :class:`RawHits` per query.

        Raises:
            QueryError: bad query (see :func:`check_queries`) or spec.
        """
        cache = self.cache
        check_spec(spec)
        q = check_queries(queries, cache.dim)
        valid = cache.alive.copy()
        if spec.listing_mask is not None:
            mask = np.asarray(spec.listing_mask, dtype=bool)
            if mask.shape != (len(cache.listings),):
                raise QueryError(
                    f"listing_mask has shape {mask.shape}, expected ({len(cache.listings)},)"
                )
            valid &= mask[cache.codes]
        rows = np.flatnonzero(valid)
        vectors = cache.vectors
        dense = len(rows) == cache.n_rows
        out: list[RawHits] = []
        block = max(1, BLOCK_BYTES // max(1, 4 * max(len(rows), 1)))
        for start in range(0, len(q), block):
            qb = q[start : start + block]
            scores = (vectors @ qb.T) if dense else (vectors[rows] @ qb.T)
            for j in range(len(qb)):
                s = np.ascontiguousarray(scores[:, j])
                if spec.group_by == "listing":
                    out.append(self._grouped(rows, s, spec))
                else:
                    out.append(self._images(rows, s, spec))
        return out

    # ------------------------------------------------------------------ helpers

    def _order(self, rows: np.ndarray, scores: np.ndarray, k: int | None) -> np.ndarray:
        """Indices into ``rows`` of the best ``k``, ordered by (-score, listing_id, image_id)."""
        idx = np.arange(len(rows))
        if k is not None and len(idx) > k:
            kth = np.partition(scores, len(scores) - k)[len(scores) - k]
            idx = np.flatnonzero(scores >= kth)  # keeps every row tied with the k-th
        keys = self.cache.keys
        cand = rows[idx]
        lid = np.array([keys[r][0] for r in cand], dtype=object)
        iid = np.array([keys[r][1] for r in cand], dtype=object)
        order = np.lexsort((iid, lid, -scores[idx].astype(np.float64)))
        return idx[order][:k] if k is not None else idx[order]

    def _images(self, rows: np.ndarray, s: np.ndarray, spec: SearchSpec) -> RawHits:
        if spec.threshold is not None:
            keep = s > np.float32(spec.threshold)
            rows, s = rows[keep], s[keep]
        sel = self._order(rows, s, spec.k)
        return RawHits(rows[sel], s[sel], np.ones(len(sel), dtype=np.int64))

    def _grouped(self, rows: np.ndarray, s: np.ndarray, spec: SearchSpec) -> RawHits:
        if len(rows) == 0:
            return RawHits(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64))
        codes = self.cache.codes[rows]
        order = np.lexsort((-s, codes))  # grouped by listing, best score first within each
        codes_sorted, s_sorted = codes[order], s[order]
        starts = np.flatnonzero(np.r_[True, codes_sorted[1:] != codes_sorted[:-1]])
        counts = np.diff(np.r_[starts, len(order)])
        if spec.agg == "max":
            agg = s_sorted[starts]
        elif spec.agg == "mean":
            agg = (np.add.reduceat(s_sorted.astype(np.float64), starts) / counts).astype(np.float32)
        else:  # sum-top-n
            csum = np.r_[0.0, np.cumsum(s_sorted, dtype=np.float64)]
            ends = starts + np.minimum(counts, spec.top_n)
            agg = (csum[ends] - csum[starts]).astype(np.float32)
        best_rows = rows[order[starts]]
        # A listing's representative image is its best one; a tie goes to the smallest image_id.
        group_of = np.repeat(np.arange(len(starts)), counts)
        tied = np.add.reduceat((s_sorted == s_sorted[starts][group_of]).astype(np.int64), starts)
        for g in np.flatnonzero(tied > 1):
            members = rows[order[starts[g] : starts[g] + tied[g]]]
            best_rows[g] = min(members, key=lambda r: self.cache.keys[r][1])
        if spec.threshold is not None:
            keep = agg > np.float32(spec.threshold)
            best_rows, agg, counts = best_rows[keep], agg[keep], counts[keep]
        sel = self._order(best_rows, agg, spec.k)
        return RawHits(best_rows[sel], agg[sel], counts[sel].astype(np.int64))
