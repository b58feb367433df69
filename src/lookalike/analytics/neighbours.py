"""Who is near whom: the shared neighbour machinery of the analytics services.

Owns reading the live vectors out of the catalog's cache (:func:`live_vectors`), the batched
kNN / threshold loop over a search engine (:func:`neighbours`), and the blocked all-pairs join
through the cells of an IVF index (:func:`ivf_index`, :func:`cell_blocks`,
:data:`JOIN_NPROBE`). :mod:`.outliers` and :mod:`.dedup` build on these; nothing here writes.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..catalog import Catalog
from ..engine import SearchEngine, VectorCache
from ..engine.ann import AnnEngine, AnnIndex
from ..types import IndexKind, Key, SearchSpec

JOIN_NPROBE = 16
"""Neighbouring IVF cells joined with each cell by :func:`~lookalike.analytics.near_duplicates`
and :func:`~lookalike.analytics.knn_outliers` through an IVF index. A near neighbour (a
near-duplicate, or one of an image's k nearest) almost always falls in the image's own cell or
one of the nearest few, so these joins need far fewer than the ``nlist / 8`` that top-k search
uses (measured in ``benchmarks/analytics.py``: groups found vs the exact scan)."""

#: Index kinds whose coarse quantizer :func:`cell_blocks` can join through.
IVF_KINDS = (IndexKind.IVF, IndexKind.IVFPQ)


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """The analytics' progress bar: tqdm on stderr counting images (``img``, images/s), a
    no-op when not ``enabled``. Use as a context manager; ``.update(n)`` as work is done."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="img",
        desc=desc,
        file=sys.stderr,
        dynamic_ncols=True,
        disable=not enabled,
    )


def live_vectors(cat: Catalog) -> tuple[list[Key], np.ndarray]:
    """Keys and vectors of the catalog's live rows, in cache order.

    Returns:
        ``(keys, (n, d) float32)``: a read-only view of the cache when every row is live (so a
        1M x 1280 collection is not copied), else a contiguous copy of the live rows.

    Raises:
        QueryError: the catalog is empty.
    """
    cache = cat.vector_cache()
    rows = np.flatnonzero(cache.alive)
    if len(rows) == cache.n_rows:
        view = cache.vectors.view()
        view.flags.writeable = False
        return list(cache.keys[: cache.n_rows]), view
    return [cache.keys[r] for r in rows], np.ascontiguousarray(cache.vectors[rows])


def live_positions(cache: VectorCache) -> tuple[np.ndarray, np.ndarray]:
    """The live rows of ``cache`` and the inverse map.

    Returns:
        ``(live (n,) int64`` cache rows of the live images, in order, ``pos_of_row (n_rows,)
        int64`` position of each row among the live ones, -1 for dead rows).
    """
    live = np.flatnonzero(cache.alive)
    pos_of_row = np.full(cache.n_rows, -1, dtype=np.int64)
    pos_of_row[live] = np.arange(len(live))
    return live, pos_of_row


def neighbours(
    cat: Catalog,
    index: str,
    k: int,
    batch: int = 256,
    threshold: float | None = None,
    positions: np.ndarray | None = None,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """The ``k`` best matches of every live image, from the catalog's engine ``index``.

    Images are searched ``batch`` at a time (one engine call each); every image finds itself
    among its matches.

    Args:
        index: the engine (``exact``, or a built ANN index: ``ivf``, ``ivfpq``, ``hnsw``).
        k: matches per image (at most the number of live images).
        threshold: only matches with ``score > threshold``.
        positions: ``(m,) int`` positions among the live rows of the images to search
            (default: all of them).

    Yields:
        ``(position, matches (<= k,) int64 positions, scores (<= k,) float32)``, best first,
        one per searched image, in the order of ``positions``.

    Raises:
        QueryError: the catalog is empty, unknown index, or no such index built.
    """
    cache = cat.vector_cache()
    engine = cat.search_engine(index)
    live, pos_of_row = live_positions(cache)
    todo = np.arange(len(live)) if positions is None else np.asarray(positions, np.int64)
    spec = SearchSpec(k=min(k, len(live)), threshold=threshold)
    for a in range(0, len(todo), batch):
        pos = todo[a : a + batch]
        block = np.ascontiguousarray(cache.vectors[live[pos]])
        for j, raw in enumerate(engine.search(block, spec)):
            yield int(pos[j]), pos_of_row[raw.rows], raw.scores


def ivf_index(engine: SearchEngine) -> AnnIndex | None:
    """The IVF index (``ivf`` or ``ivfpq``) behind ``engine``, or None for any other engine
    (exact engines, HNSW)."""
    if isinstance(engine, AnnEngine) and engine.ann.params.kind in IVF_KINDS:
        return engine.ann
    return None


def cell_blocks(
    ann: AnnIndex, x: np.ndarray, nprobe: int | None = None, block: int = 1024
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The blocked all-pairs join of an inverted file, one cell at a time.

    The ``(n, d) float32`` vectors ``x`` are bucketed by the coarse quantizer of the IVF index
    ``ann``; each cell's members are scored against the members of the ``nprobe`` cells
    nearest its centroid (its own among them) with float32 matrix products: exact scores,
    ``O(n^2 d nprobe / nlist)`` work. A pair whose cells do not probe each other is not scored.

    Args:
        ann: an ``ivf`` or ``ivfpq`` index (see :func:`ivf_index`).
        x: ``(n, d) float32`` vectors (the catalog's live rows).
        nprobe: cells joined with each cell (default :data:`JOIN_NPROBE`, at most ``nlist``).
        block: most rows of one cell scored at a time.

    Yields:
        ``(rows (m,) int64, cand (c,) int64, scores (m, c) float32)``: positions in ``x`` of
        up to ``block`` members of one cell, of its candidates (the members themselves
        included), and their scores. Memory: one score block and ``c`` gathered vectors at a
        time.
    """
    import faiss

    ivf = faiss.extract_index_ivf(ann.index)
    nlist = int(ivf.nlist)
    nprobe = max(1, min(nprobe or JOIN_NPROBE, nlist))
    quantizer = ivf.quantizer
    cell = np.empty(len(x), dtype=np.int64)
    for a in range(0, len(x), 65536):  # coarse assignment, in blocks (faiss copies its input)
        cell[a : a + 65536] = quantizer.search(x[a : a + 65536], 1)[1][:, 0]
    order = np.argsort(cell, kind="stable")  # positions grouped by cell
    bounds = np.searchsorted(cell[order], np.arange(nlist + 1))
    _, near = quantizer.search(quantizer.reconstruct_n(0, nlist), nprobe)
    for c in range(nlist):
        a, b = int(bounds[c]), int(bounds[c + 1])
        if a == b:
            continue
        probe = sorted({int(p) for p in near[c] if p >= 0} | {c})
        cand = np.concatenate([order[bounds[p] : bounds[p + 1]] for p in probe])
        y = x[cand]
        for q0 in range(a, b, block):
            rows = order[q0 : min(b, q0 + block)]
            yield rows, cand, x[rows] @ y.T
