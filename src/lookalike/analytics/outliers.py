"""Outlier scores of the stored images: mean distance to the k nearest, or IsolationForest.

Owns :func:`knn_outliers` (exact, HNSW, or through an IVF index with the top of the ranking
certified exact), :func:`isolation_outliers` and their :class:`OutlierReport`; writes
``outlier_score`` per image to the catalog's analysis columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..catalog import Catalog
from ..errors import LookalikeError
from ..types import IndexKind, Key
from .neighbours import cell_blocks, ivf_index, live_vectors, neighbours, progress_bar


@dataclass
class OutlierReport:
    """Outlier scores (higher = more unusual), ``(n,) float32`` in the order of ``keys``;
    ``method`` names how they were computed (``knn-10``, ``knn-10-ivf``,
    ``isolation-forest``)."""

    keys: list[Key]
    scores: np.ndarray
    method: str

    def top(self, n: int = 10) -> list[tuple[str, str, float]]:
        """The ``n`` most unusual images: ``(listing_id, image_id, score)``, highest first."""
        order = np.argsort(-self.scores, kind="stable")[:n]
        return [(self.keys[i][0], self.keys[i][1], float(self.scores[i])) for i in order]


def knn_outliers(
    cat: Catalog,
    k: int = 10,
    save: bool = True,
    batch: int = 256,
    index: str = "exact",
    nprobe: int | None = None,
    top: int = 100,
    progress: bool = False,
) -> OutlierReport:
    """k-NN distance score: ``1 - mean cosine`` to the ``k`` nearest other images.

    An image far from all others scores high (Ramaswamy, Rastogi & Shim, SIGMOD 2000, use the
    k-th neighbour; the mean over k is steadier).

    With ``index="exact"`` every image's neighbours come from the catalog's exact engine, in
    batches of ``batch`` (``O(n^2 d)`` work, ``O(n k)`` memory). Through a built IVF index
    (``"ivf"``, ``"ivfpq"``) the neighbours come from the blocked cell join
    (:func:`~lookalike.analytics.neighbours.cell_blocks`, ``nprobe`` cells, default
    :data:`~lookalike.analytics.neighbours.JOIN_NPROBE`), a fraction of the work. A neighbour
    outside the probed cells is missed, so such a score is an *upper bound* of the exact one;
    the images with the highest bounds are then re-scored with the exact engine, doubling
    their number until the ``top``-th best exact score is at least every bound left (no other
    image can beat it). So the ``top`` outliers and their scores are exactly the exact path's;
    the rest are bounds (measured in ``benchmarks/analytics.py``).

    Args:
        k: neighbours averaged.
        save: store the scores per image (``outlier_score``).
        batch: images per engine call.
        index: ``"exact"``, ``"ivf"``, ``"ivfpq"`` (see above) or ``"hnsw"`` (the engine's
            graph search, approximate).
        nprobe: cells joined per cell through IVF.
        top: through IVF, how many of the highest scores are made exact.
        progress: a tqdm bar on stderr.

    Returns:
        Scores in ``[0, 2]``, ``(n,) float32`` in the order of ``keys``.

    Raises:
        LookalikeError: fewer than 2 vectors.
        QueryError: unknown index, or no such index built.
    """
    engine = cat.search_engine(index)
    keys, x = live_vectors(cat)
    n = len(keys)
    if n < 2:
        raise LookalikeError("outlier scores need at least 2 vectors")
    scores = np.empty(n, dtype=np.float32)

    def by_search(using: str, positions: np.ndarray | None, bar: Any) -> None:
        """Scores of the images at ``positions`` (all if None) from engine ``using``."""
        for i, pos, sims in neighbours(cat, using, k + 1, batch, positions=positions):
            others = sims[pos != i][:k]
            scores[i] = 1.0 - float(np.mean(others)) if len(others) else 1.0
            bar.update(1)

    ann = ivf_index(engine)
    with progress_bar(n, "outliers", progress) as bar:
        if ann is None:  # exact, or HNSW's approximate neighbours
            by_search(index, None, bar)
        else:
            for rows, cand, sims in cell_blocks(ann, x, nprobe):
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
                by_search(IndexKind.EXACT, fresh, bar)
                done[fresh] = True
                kth = np.partition(scores[order[:m]], m - want)[m - want]
                if m == n or kth >= bound[order[m]] + 1e-5:  # margin: float32 rounding
                    break
                m = min(n, 2 * m)
    if save:
        cat.save_analysis(keys, {"outlier_score": scores.tolist()})
    return OutlierReport(keys, scores, f"knn-{k}" + ("" if index == "exact" else f"-{index}"))


def isolation_outliers(cat: Catalog, seed: int = 0, save: bool = True) -> OutlierReport:
    """IsolationForest score (Liu, Ting & Zhou, ICDM 2008; scikit-learn, 200 trees), higher =
    more unusual (the negated ``score_samples``).

    Args:
        seed: the forest's random state.
        save: store the scores per image (``outlier_score``).

    Returns:
        ``(n,) float32`` scores in the order of the live images.

    Raises:
        QueryError: the catalog is empty.
    """
    from sklearn.ensemble import IsolationForest

    keys, x = live_vectors(cat)
    forest = IsolationForest(random_state=seed, n_estimators=200).fit(x)
    scores = (-forest.score_samples(x)).astype(np.float32)
    if save:
        cat.save_analysis(keys, {"outlier_score": scores.tolist()})
    return OutlierReport(keys, scores, "isolation-forest")
