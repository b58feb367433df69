"""Ranking and grouping: the search semantics every engine shares, as plain functions.

Every engine finds candidate rows and their exact float32 scores its own way, then hands them
to :func:`rank` (or :func:`rank_images` / :func:`rank_listings`), so the answers agree:

* **score** = inner product of the (L2-normalized) query with each vector, float32.
* **image-level**: the ``k`` highest scores; with ``threshold`` only rows with ``score >
  threshold`` (and all of them when ``k`` is None).
* **group aggregation** (``group_by="listing"``): per listing, over its live (and filtered)
  images, ``max`` (default), ``mean``, or ``sum-top-n`` (sum of the ``top_n`` highest); one hit
  per listing, carrying the listing's best image (a tie goes to the smallest ``image_id``).
  ``threshold`` then applies to the aggregate.
* **filters**: a boolean mask over listing numbers, applied before ranking (a filtered-out row
  never takes a top-k slot); the engines apply it before calling these functions.
* **order**: score descending, ties broken by ``(listing_id, image_id)`` ascending, so every
  engine returns the same list.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from ..types import Aggregation, GroupBy, Key, RawHits, SearchSpec
from .cache import VectorCache


def order_hits(
    keys: Sequence[Key], rows: npt.NDArray[np.int64], scores: npt.NDArray[np.float32], k: int | None
) -> npt.NDArray[np.intp]:
    """Positions in ``rows`` of the best ``k`` (all when None), ordered by score descending,
    then ``(listing_id, image_id)`` ascending.

    Args:
        keys: the cache's keys (``keys[row]``).
        rows: ``(m,) int64`` cache rows.
        scores: ``(m,) float32`` their scores.
        k: how many to keep.
    """
    idx = np.arange(len(rows))
    if k is not None and len(idx) > k:
        kth = np.partition(scores, len(scores) - k)[len(scores) - k]
        idx = np.flatnonzero(scores >= kth)  # keeps every row tied with the k-th
    picked = scores[idx]
    order = np.argsort(-picked, kind="stable")
    ranked = picked[order]
    if not np.any(ranked[1:] == ranked[:-1]):  # no ties: the keys cannot change the order
        return idx[order][:k] if k is not None else idx[order]
    cand = rows[idx]
    lid = np.array([keys[r][0] for r in cand], dtype=object)
    iid = np.array([keys[r][1] for r in cand], dtype=object)
    order = np.lexsort((iid, lid, -picked.astype(np.float64)))
    return idx[order][:k] if k is not None else idx[order]


def rank_images(
    cache: VectorCache,
    rows: npt.NDArray[np.int64],
    scores: npt.NDArray[np.float32],
    spec: SearchSpec,
) -> RawHits:
    """Image-level hits of scored rows: threshold, then the best ``spec.k`` in order.

    Args:
        rows: ``(m,) int64`` live, filtered cache rows (each at most once).
        scores: ``(m,) float32`` their exact scores.
    """
    if spec.threshold is not None:
        keep = scores > np.float32(spec.threshold)
        rows, scores = rows[keep], scores[keep]
    sel = order_hits(cache.keys, rows, scores, spec.k)
    return RawHits(rows[sel], scores[sel], np.ones(len(sel), dtype=np.int64))


def rank_listings(
    cache: VectorCache,
    rows: npt.NDArray[np.int64],
    scores: npt.NDArray[np.float32],
    spec: SearchSpec,
) -> RawHits:
    """Listing-level hits of scored rows: aggregate per listing (``spec.agg``, ``spec.top_n``),
    threshold the aggregate, then the best ``spec.k`` in order.

    Args:
        rows: ``(m,) int64`` live, filtered cache rows (each at most once); a listing's
            aggregate is over the rows of it given here, so pass all of them.
        scores: ``(m,) float32`` their exact scores.

    Returns:
        One hit per listing: its best row, the aggregate (float32), the number of rows scored.
    """
    if len(rows) == 0:
        return RawHits.empty()
    s = scores
    lnum = cache.row_listing[rows]
    order = np.lexsort((-s, lnum))  # grouped by listing, best score first within each
    lnum_sorted, s_sorted = lnum[order], s[order]
    starts = np.flatnonzero(np.r_[True, lnum_sorted[1:] != lnum_sorted[:-1]])
    counts = np.diff(np.r_[starts, len(order)])
    if spec.agg == Aggregation.MAX:
        agg = s_sorted[starts]
    elif spec.agg == Aggregation.MEAN:
        agg = (np.add.reduceat(s_sorted.astype(np.float64), starts) / counts).astype(np.float32)
    else:  # sum-top-n
        csum = np.r_[0.0, np.cumsum(s_sorted, dtype=np.float64)]
        ends = starts + np.minimum(counts, spec.top_n)
        agg = (csum[ends] - csum[starts]).astype(np.float32)
    best_rows = rows[order[starts]]
    # A listing's representative image is its best one; a tie goes to the smallest image_id.
    group_of = np.repeat(np.arange(len(starts)), counts)
    tied = np.add.reduceat((s_sorted == s_sorted[starts][group_of]).astype(np.int64), starts)
    keys = cache.keys
    for g in np.flatnonzero(tied > 1):
        members = rows[order[starts[g] : starts[g] + tied[g]]]
        best_rows[g] = min(members, key=lambda r: keys[r][1])
    if spec.threshold is not None:
        keep = agg > np.float32(spec.threshold)
        best_rows, agg, counts = best_rows[keep], agg[keep], counts[keep]
    sel = order_hits(keys, best_rows, agg, spec.k)
    return RawHits(best_rows[sel], agg[sel], counts[sel].astype(np.int64))


def rank(
    cache: VectorCache,
    rows: npt.NDArray[np.int64],
    scores: npt.NDArray[np.float32],
    spec: SearchSpec,
) -> RawHits:
    """:func:`rank_listings` when ``spec.group_by`` is ``listing``, else :func:`rank_images`."""
    if spec.group_by == GroupBy.LISTING:
        return rank_listings(cache, rows, scores, spec)
    return rank_images(cache, rows, scores, spec)
