"""Analytics on the stored feature vectors: clusters, outliers, near-duplicates, a 2-D map.

All of it reads the catalog's in-RAM vector cache (live rows only) and writes per-image results
to the store's ``image_analysis`` table, where the HTTP ``/map`` and the web page's Explore view
read them.

* :func:`kmeans`: spherical k-means (faiss), cluster id and distance per image, a
  representative (the image nearest its centroid) per cluster;
* :func:`knn_outliers` / :func:`isolation_outliers`: an outlier score per image;
* :func:`near_duplicates`: groups of images with ``score > t`` (connected components of the
  threshold graph, from the engine's threshold search; no ``n x n`` matrix), and
  :func:`exact_duplicates` by file hash;
* :func:`project`: 2-D PCA (always) or UMAP (when ``umap-learn`` is installed).
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..catalog import Catalog
from ..errors import LookalikeError
from ..types import Key, SearchSpec
from .projection import map_points as map_points
from .projection import pca_2d


def _live(cat: Catalog) -> tuple[list[Key], np.ndarray]:
    """Keys and ``(n, d) float32`` vectors of the live rows, in cache order (a read-only view
    of the cache when every row is live, so a 1M x 1280 collection is not copied)."""
    cache = cat.vector_cache()
    rows = np.flatnonzero(cache.alive)
    if len(rows) == cache.n_rows:
        view = cache.vectors.view()
        view.flags.writeable = False
        return list(cache.keys[: cache.n_rows]), view
    return [cache.keys[r] for r in rows], np.ascontiguousarray(cache.vectors[rows])


def _neighbours(cat: Catalog, index: str, k: int, batch: int = 256,
                threshold: float | None = None, positions: np.ndarray | None = None):
    """For every live image (or those at ``positions``, indices into the live rows):
    ``(its position, positions of its <= k best matches, scores)`` (itself included; only
    matches above ``threshold`` if given), from the catalog's engine, ``batch`` at a time."""
    cache = cat.vector_cache()
    engine = cat.search_engine(index)
    live = np.flatnonzero(cache.alive)
    pos_of_row = np.full(cache.n_rows, -1, dtype=np.int64)
    pos_of_row[live] = np.arange(len(live))
    todo = np.arange(len(live)) if positions is None else np.asarray(positions, np.int64)
    spec = SearchSpec(k=min(k, len(live)), threshold=threshold)
    for a in range(0, len(todo), batch):
        pos = todo[a : a + batch]
        block = np.ascontiguousarray(cache.vectors[live[pos]])
        for j, raw in enumerate(engine.search(block, spec)):
            yield int(pos[j]), pos_of_row[raw.rows], raw.scores


JOIN_NPROBE = 16
"""Neighbouring IVF cells joined with each cell by :func:`near_duplicates` and
:func:`knn_outliers` through an IVF index. A near neighbour (a near-duplicate, or one of an
image's k nearest) almost always falls in the image's own cell or one of the nearest few, so
these joins need far fewer than the ``nlist / 8`` that top-k search uses (measured in
``benchmarks/analytics.py``: groups found vs the exact scan)."""


def _ivf_kind(engine: Any) -> bool:
    ann = getattr(engine, "ann", None)
    return ann is not None and ann.params.kind in ("ivf", "ivfpq")


def _cell_blocks(ann: Any, x: np.ndarray, nprobe: int | None, block: int = 1024):
    """The blocked all-pairs join of an inverted file, one cell at a time.

    The ``(n, d) float32`` vectors ``x`` are bucketed by the coarse quantizer of the IVF index
    in ``ann``; each cell's members are scored against the members of the ``nprobe`` cells
    nearest its centroid (its own among them) with float32 matrix products: exact scores,
    ``O(n^2 d nprobe / nlist)`` work. A pair whose cells do not probe each other is not scored.

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


# ------------------------------------------------------------------------------------ k-means


def default_k(n: int) -> int:
    """The rule of thumb ``k = sqrt(n / 2)`` (Mardia, Kent & Bibby, *Multivariate Analysis*,
    1979), at least 2 and at most ``n``."""
    return max(2, min(n, round(math.sqrt(n / 2))))


@dataclass
class Cluster:
    """One cluster: id, size and the image nearest its centroid."""

    id: int
    size: int
    representative: str
    representative_listing: str


@dataclass
class ClusterReport:
    """Result of :func:`kmeans`.

    Attributes:
        assignments: ``(n,) int64`` cluster per live image (order of ``keys``).
        distances: ``(n,) float32`` 1 - cosine to the image's centroid.
    """

    k: int
    keys: list[Key]
    assignments: np.ndarray
    distances: np.ndarray
    clusters: list[Cluster] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON contract: ``{"k", "clusters": [{"id", "size", "representative"}]}``."""
        return {"k": self.k, "clusters": [
            {"id": c.id, "size": c.size, "representative": c.representative,
             "listing_id": c.representative_listing} for c in self.clusters]}


def kmeans(cat: Catalog, k: int | None = None, niter: int = 25, seed: int = 0,
           save: bool = True) -> ClusterReport:
    """Spherical k-means of the live vectors with faiss (inner product on unit vectors).

    Args:
        k: clusters; default :func:`default_k`.
        save: store cluster id and distance per image in ``image_analysis``.

    Raises:
        LookalikeError: fewer than 2 vectors, or ``k`` larger than the collection.
    """
    import faiss

    keys, x = _live(cat)
    n = len(keys)
    if n < 2:
        raise LookalikeError("clustering needs at least 2 vectors")
    k = default_k(n) if k is None else k
    if not 1 <= k <= n:
        raise LookalikeError(f"k must be between 1 and {n} (the number of vectors), got {k}")
    # faiss trains on at most 256 points per centroid (a seeded sample), then assigns all
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True,
                      max_points_per_centroid=256, min_points_per_centroid=1, verbose=False)
    km.train(x)
    sims, assign = km.index.search(x, 1)
    assign = assign[:, 0].astype(np.int64)
    dist = (1.0 - sims[:, 0]).astype(np.float32)
    clusters = []
    for c in range(k):
        members = np.flatnonzero(assign == c)
        if len(members) == 0:
            continue
        rep = members[np.argmin(dist[members])]
        clusters.append(Cluster(c, len(members), keys[rep][1], keys[rep][0]))
    clusters.sort(key=lambda c: -c.size)
    if save:
        cat.save_analysis(keys, {"cluster": assign, "cluster_distance": dist})
    return ClusterReport(k, keys, assign, dist, clusters)


# ------------------------------------------------------------------------------------ outliers


@dataclass
class OutlierReport:
    """Outlier scores (higher = more unusual), in the order of ``keys``."""

    keys: list[Key]
    scores: np.ndarray
    method: str

    def top(self, n: int = 10) -> list[tuple[str, str, float]]:
        """The ``n`` most unusual images: ``(listing_id, image_id, score)``."""
        order = np.argsort(-self.scores, kind="stable")[:n]
        return [(self.keys[i][0], self.keys[i][1], float(self.scores[i])) for i in order]


def knn_outliers(cat: Catalog, k: int = 10, save: bool = True, batch: int = 256,
                 index: str = "exact", nprobe: int | None = None, top: int = 100,
                 progress: bool = False) -> OutlierReport:
    """k-NN distance score: ``1 - mean cosine`` to the ``k`` nearest other images.

    An image far from all others scores high (Ramaswamy, Rastogi & Shim, SIGMOD 2000, use the
    k-th neighbour; the mean over k is steadier).

    With ``index="exact"`` every image's neighbours come from the catalog's exact engine, in
    batches of ``batch`` (``O(n^2 d)`` work, ``O(n k)`` memory). Through a built IVF index
    (``"ivf"``, ``"ivfpq"``) the neighbours come from the blocked cell join
    (:func:`_cell_blocks`, ``nprobe`` cells, default :data:`JOIN_NPROBE`), a fraction of the
    work. A neighbour outside the probed cells is missed, so such a score is an *upper bound*
    of the exact one; the images with the highest bounds are then re-scored with the exact
    engine, doubling their number until the ``top``-th best exact score is at least every bound
    left (no other image can beat it). So the ``top`` outliers and their scores are exactly
    the exact path's; the rest are bounds (measured in ``benchmarks/analytics.py``).

    Args:
        k: neighbours averaged.
        index: ``"exact"``, ``"ivf"``, ``"ivfpq"`` (see above) or ``"hnsw"`` (the engine's
            graph search, approximate).
        top: through IVF, how many of the highest scores are made exact.
        progress: a tqdm bar on stderr.

    Returns:
        Scores in ``[0, 2]``, ``(n,) float32`` in the order of ``keys``; stored per image
        (``outlier_score``) when ``save``.

    Raises:
        LookalikeError: fewer than 2 vectors.
        QueryError: unknown index, or no such index built.
    """
    from tqdm import tqdm

    engine = cat.search_engine(index)
    keys, x = _live(cat)
    n = len(keys)
    if n < 2:
        raise LookalikeError("outlier scores need at least 2 vectors")
    scores = np.empty(n, dtype=np.float32)

    def by_search(using: str, positions: np.ndarray | None, bar: Any) -> None:
        """Scores of the images at ``positions`` (all if None) from engine ``using``."""
        for i, pos, sims in _neighbours(cat, using, k + 1, batch, positions=positions):
            others = sims[pos != i][:k]
            scores[i] = 1.0 - float(np.mean(others)) if len(others) else 1.0
            bar.update(1)

    with tqdm(total=n, unit="img", desc="outliers", file=sys.stderr, dynamic_ncols=True,
              disable=not progress) as bar:
        if not _ivf_kind(engine):  # exact, or HNSW's approximate neighbours
            by_search(index, None, bar)
        else:
            for rows, cand, sims in _cell_blocks(engine.ann, x, nprobe):
                sims[rows[:, None] == cand[None, :]] = -np.inf  # not its own neighbour
                kk = min(k, len(cand) - 1)
                total = np.zeros(len(rows), dtype=np.float32)
                if kk >= 1:
                    total = (-np.partition(-sims, kk - 1, axis=1)[:, :kk]).sum(axis=1)
                # fewer than k candidates: the missing neighbours count as cosine -1, so the
                # score stays an upper bound of the exact one
                scores[rows] = 1.0 - (total - (k - kk)) / k
                bar.update(len(rows))
            bound = scores.copy()
            order = np.argsort(-bound, kind="stable")
            done = np.zeros(n, dtype=bool)
            want = min(max(1, top), n)
            m = min(n, max(2 * want, 64))
            while True:  # certify the top: re-score the highest bounds exactly
                fresh = order[:m][~done[order[:m]]]
                bar.total += len(fresh)
                by_search("exact", fresh, bar)
                done[fresh] = True
                kth = np.partition(scores[order[:m]], m - want)[m - want]
                if m == n or kth >= bound[order[m]] + 1e-5:  # margin: float32 rounding
                    break
                m = min(n, 2 * m)
    if save:
        cat.save_analysis(keys, {"outlier_score": scores})
    return OutlierReport(keys, scores, f"knn-{k}" + ("" if index == "exact" else f"-{index}"))


def isolation_outliers(cat: Catalog, seed: int = 0, save: bool = True) -> OutlierReport:
    """IsolationForest score (Liu, Ting & Zhou, ICDM 2008; scikit-learn), higher = more
    unusual (the negated ``score_samples``)."""
    from sklearn.ensemble import IsolationForest

    keys, x = _live(cat)
    forest = IsolationForest(random_state=seed, n_estimators=200).fit(x)
    scores = (-forest.score_samples(x)).astype(np.float32)
    if save:
        cat.save_analysis(keys, {"outlier_score": scores})
    return OutlierReport(keys, scores, "isolation-forest")


# ------------------------------------------------------------------------------------ duplicates


class _UnionFind:
    """Disjoint sets over ``0..n-1`` (Tarjan, JACM 1975: union by smaller root, path
    compression), with a vectorized :meth:`union_many` for blocks of edges."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        p = self.parent
        root = i
        while p[root] != root:
            root = p[root]
        while p[i] != root:
            p[i], i = root, p[i]
        return int(root)

    def union(self, a: int, b: int) -> None:
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
            pairs = np.unique(np.stack([np.minimum(ra[cut], rb[cut]),
                                        np.maximum(ra[cut], rb[cut])], axis=1), axis=0)
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


def near_duplicates(cat: Catalog, threshold: float = 0.95, k: int = 32, batch: int = 512,
                    index: str = "exact", nprobe: int | None = None,
                    progress: bool = False) -> list[list[Key]]:
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
        threshold: cosine above which two images are near-duplicates.
        k: matches asked per image before the unlimited re-query (exact / HNSW).
        batch: images per engine call (exact / HNSW).
        index: ``"exact"`` or a built ANN index (``lookalike ann build``).
        nprobe: cells scanned per cell through IVF (default :data:`JOIN_NPROBE`, at most
            ``nlist``); the index's own search settings are not touched.
        progress: a tqdm bar on stderr (images joined, images/s).

    Returns:
        Groups of two or more keys, largest first; keys within a group sorted.

    Raises:
        QueryError: unknown index, or no such index built.
    """
    from tqdm import tqdm

    engine = cat.search_engine(index)
    keys, x = _live(cat)
    uf = _UnionFind(len(keys))
    with tqdm(total=len(keys), unit="img", desc="dedup", file=sys.stderr, dynamic_ncols=True,
              disable=not progress) as bar:
        if _ivf_kind(engine):
            _cell_join(engine.ann, x, threshold, nprobe, uf, bar)
        else:
            _scan_join(cat, engine, x, threshold, k, batch, index, uf, bar)
    return uf.groups(keys)


def _scan_join(cat: Catalog, engine: Any, x: np.ndarray, threshold: float, k: int, batch: int,
               index: str, uf: _UnionFind, bar: Any) -> None:
    """Edges from the engine's batched threshold search (see :func:`near_duplicates`)."""
    n = len(x)
    cache = cat.vector_cache()
    live = np.flatnonzero(cache.alive)
    pos_of_row = np.full(cache.n_rows, -1, dtype=np.int64)
    pos_of_row[live] = np.arange(len(live))
    for i, matched, _ in _neighbours(cat, index, k, batch, threshold):
        if len(matched) == min(k, n):  # saturated: this image's matches, however many
            raw = engine.search(x[i], SearchSpec(k=None, threshold=threshold))[0]
            matched = pos_of_row[raw.rows]
        matched = matched[matched != i]
        uf.union_many(np.full(len(matched), i), matched)
        bar.update(1)


def _cell_join(ann: Any, x: np.ndarray, threshold: float, nprobe: int | None, uf: _UnionFind,
               bar: Any) -> None:
    """Edges from the blocked join over the IVF cells of ``ann`` (:func:`_cell_blocks`)."""
    for rows, cand, scores in _cell_blocks(ann, x, nprobe):
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


# ------------------------------------------------------------------------------------ map


def project(cat: Catalog, method: str = "pca", save: bool = True, seed: int = 0) -> \
        tuple[list[Key], np.ndarray, str]:
    """2-D coordinates of every live image: PCA (numpy SVD), or UMAP (McInnes et al., 2018)
    when ``method="umap"`` and ``umap-learn`` is installed (else PCA, reported in the result).

    Returns:
        ``(keys, (n, 2) float32, method used)``.
    """
    keys, x = _live(cat)
    used = "pca"
    xy: np.ndarray
    if method == "umap":
        try:
            import umap  # type: ignore[import-not-found]

            xy = umap.UMAP(n_components=2, metric="cosine", random_state=seed).fit_transform(x)
            used = "umap"
        except ImportError:
            method = "pca"
    if used == "pca":
        xy = pca_2d(x)
    xy = np.asarray(xy, dtype=np.float32)
    if save:
        cat.save_analysis(keys, {"x": xy[:, 0], "y": xy[:, 1]})
    return keys, xy, used


def render_map_png(path: str, cat: Catalog, outliers_top: int = 10) -> dict[str, Any]:
    """Draw the stored map (computing PCA if none) as a PNG scatter coloured by cluster, the
    ``outliers_top`` highest outlier scores circled in red (matplotlib, Agg backend).

    Returns:
        What was drawn: points, clusters, outliers marked.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    analysis = cat.analysis()
    keys, _ = _live(cat)
    if not keys:
        raise LookalikeError("the catalog is empty")
    if any(analysis.get(k, {}).get("x") is None for k in keys):
        project(cat)
        analysis = cat.analysis()
    xy = np.array([[analysis[k]["x"], analysis[k]["y"]] for k in keys])
    clusters = np.array([analysis[k].get("cluster") if analysis[k].get("cluster") is not None
                         else -1 for k in keys])
    scores = np.array([analysis[k].get("outlier_score") if analysis[k].get("outlier_score")
                       is not None else np.nan for k in keys], dtype=float)
    fig, ax = plt.subplots(figsize=(9, 7), dpi=110)
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=clusters, cmap="tab20", s=18, alpha=0.85,
                    linewidths=0)
    marked = 0
    if np.isfinite(scores).any():
        top = np.argsort(-np.nan_to_num(scores, nan=-np.inf))[:outliers_top]
        ax.scatter(xy[top, 0], xy[top, 1], s=110, facecolors="none", edgecolors="red",
                   linewidths=1.6, label=f"top {len(top)} outliers")
        marked = len(top)
        ax.legend(loc="best")
    n_clusters = len(set(clusters.tolist()) - {-1})
    ax.set_title(f"{len(keys)} images, {n_clusters} clusters (colour), "
                 f"2-D projection of the feature vectors")
    ax.set_xticks([])
    ax.set_yticks([])
    if n_clusters:
        fig.colorbar(sc, ax=ax, label="cluster")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return {"points": len(keys), "clusters": n_clusters, "outliers_marked": marked, "png": path}
