"""Duplicates among the stored images: near (score above a threshold) and exact (same bytes).

Owns :func:`near_duplicates` (connected components of the threshold graph, from the engine's
batched threshold search or the blocked IVF cell join; never an ``n x n`` matrix),
:func:`exact_duplicates` (by file SHA-256) and the disjoint-set structure
(:class:`UnionFind`) that merges the edges. Nothing here writes to the catalog.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from ..catalog import Catalog
from ..engine import SearchEngine
from ..engine.ann import AnnIndex
from ..types import Key, SearchSpec
from .calibrate import near_duplicate_threshold
from .neighbours import (
    cell_blocks,
    ivf_index,
    live_positions,
    live_vectors,
    neighbours,
    progress_bar,
)


class UnionFind:
    """Disjoint sets over ``0..n-1`` (Tarjan, JACM 1975: union by smaller root, path
    compression), with a vectorized :meth:`union_many` for blocks of edges."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        """The root of ``i`` (compressing the path to it)."""
        p = self.parent
        root = i
        while p[root] != root:
            root = p[root]
        while p[i] != root:
            p[i], i = root, p[i]
        return int(root)

    def union(self, a: int, b: int) -> None:
        """Merge the sets of ``a`` and ``b`` (the smaller root becomes the root)."""
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self, idx: np.ndarray) -> np.ndarray:
        """``(m,) int64`` roots of ``idx`` (pointer jumping in numpy)."""
        r = self.parent[idx]
        while True:
            nr = self.parent[r]
            if np.array_equal(nr, r):
                return r
            r = nr

    def union_many(self, a: np.ndarray, b: np.ndarray) -> None:
        """Union every edge ``(a[i], b[i])``: roots found in numpy, so only edges joining two
        different sets reach the Python loop (a dense group costs one pass, not one per edge)."""
        if not len(a):
            return
        ra, rb = self.roots(a), self.roots(b)
        self.parent[a], self.parent[b] = ra, rb  # path compression
        cut = ra != rb
        if cut.any():
            lo, hi = np.minimum(ra[cut], rb[cut]), np.maximum(ra[cut], rb[cut])
            pairs = np.unique(np.stack([lo, hi], axis=1), axis=0)
            for u, v in pairs.tolist():
                self.union(u, v)

    def groups(self, keys: list[Key]) -> list[list[Key]]:
        """Sets of two or more, largest first; keys within a set sorted."""
        roots = self.roots(np.arange(len(keys)))
        members: dict[int, list[Key]] = defaultdict(list)
        for i, r in enumerate(roots.tolist()):
            members[r].append(keys[i])
        out = [sorted(g) for g in members.values() if len(g) > 1]
        out.sort(key=lambda g: (-len(g), g[0]))
        return out


def near_duplicates(
    cat: Catalog,
    threshold: float | None = None,
    k: int = 32,
    batch: int = 512,
    index: str = "exact",
    nprobe: int | None = None,
    progress: bool = False,
) -> list[list[Key]]:
    """Groups of images connected by ``score > threshold`` (connected components).

    ``index="exact"``: every image queries the engine for its ``k`` best matches above the
    threshold, in batches of ``batch``; an image with ``k`` of them asks again without a limit
    (the engine's threshold scan), so no edge is missed. ``O(n^2 d)`` work on the engine's
    kernels, ``O(n k)`` memory, never an ``n x n`` matrix.

    Through an IVF index (``"ivf"``, ``"ivfpq"``): the vectors are bucketed by the index's
    coarse quantizer, and each cell's members are scored (float32 matrix products, exact
    scores) against the members of the ``nprobe`` cells nearest its centroid (its own among
    them): the blocked all-pairs join of an inverted file, ``O(n^2 d nprobe / nlist)`` work.
    A pair in two cells neither of which probes the other is missed; nothing is invented.
    Through ``"hnsw"``: the engine's per-image search, as for exact (pairs can be missed).

    Args:
        threshold: cosine above which two images are near-duplicates; None: the catalog's
            calibrated threshold, else its extractor's measured default
            (:func:`lookalike.analytics.calibrate.near_duplicate_threshold`).
        k: matches asked per image before the unlimited re-query (exact / HNSW).
        batch: images per engine call (exact / HNSW).
        index: ``"exact"`` or a built ANN index (``lookalike ann build``).
        nprobe: cells scanned per cell through IVF (default
            :data:`~lookalike.analytics.neighbours.JOIN_NPROBE`, at most ``nlist``); the
            index's own search settings are not touched.
        progress: a tqdm bar on stderr (images joined, images/s).

    Returns:
        Groups of two or more keys, largest first; keys within a group sorted.

    Raises:
        QueryError: unknown index, or no such index built.
        LookalikeError: no threshold given and none known for the catalog's vectors.
    """
    if threshold is None:
        threshold = near_duplicate_threshold(cat)[0]
    engine = cat.search_engine(index)
    keys, x = live_vectors(cat)
    uf = UnionFind(len(keys))
    ann = ivf_index(engine)
    with progress_bar(len(keys), "dedup", progress) as bar:
        if ann is not None:
            _cell_join(ann, x, threshold, nprobe, uf, bar)
        else:
            _scan_join(cat, engine, x, threshold, k, batch, index, uf, bar)
    return uf.groups(keys)


def _scan_join(
    cat: Catalog,
    engine: SearchEngine,
    x: np.ndarray,
    threshold: float,
    k: int,
    batch: int,
    index: str,
    uf: UnionFind,
    bar: Any,
) -> None:
    """Edges from the engine's batched threshold search (see :func:`near_duplicates`)."""
    n = len(x)
    _, pos_of_row = live_positions(cat.vector_cache())
    for i, found, _ in neighbours(cat, index, k, batch, threshold):
        matched = found
        if len(matched) == min(k, n):  # saturated: this image's matches, however many
            raw = engine.search(x[i], SearchSpec(k=None, threshold=threshold))[0]
            matched = pos_of_row[raw.rows]
        matched = matched[matched != i]
        uf.union_many(np.full(len(matched), i), matched)
        bar.update(1)


def _cell_join(
    ann: AnnIndex, x: np.ndarray, threshold: float, nprobe: int | None, uf: UnionFind, bar: Any
) -> None:
    """Edges from the blocked join over the IVF cells of ``ann`` (:func:`cell_blocks`)."""
    for rows, cand, scores in cell_blocks(ann, x, nprobe):
        ii, jj = np.nonzero(scores > threshold)
        ii, jj = rows[ii], cand[jj]
        keep = ii != jj
        uf.union_many(ii[keep], jj[keep])
        bar.update(len(rows))


def exact_duplicates(cat: Catalog) -> list[list[Key]]:
    """Groups of images whose files have the same SHA-256 (identical bytes).

    Returns:
        Groups of two or more keys, largest first; keys within a group sorted.
    """
    by_sha: dict[str, list[Key]] = defaultdict(list)
    for key, sha in cat.sha256s().items():
        by_sha[sha].append(key)
    out = [sorted(g) for g in by_sha.values() if len(g) > 1]
    out.sort(key=lambda g: (-len(g), g[0]))
    return out
