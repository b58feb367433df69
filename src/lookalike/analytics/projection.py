"""2-D maps of a collection: PCA (numpy SVD) or UMAP, and the sampled map the web page shows.

One PCA for the whole project: :func:`pca_2d` is used by ``lookalike analyze map`` (through
:func:`lookalike.analytics.project`) and by the HTTP ``GET /map`` (through :func:`map_points`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..catalog import Catalog
from ..types import Key


def pca_2d(x: np.ndarray) -> np.ndarray:
    """First two principal components of ``(n, d)`` vectors: ``(n, 2) float64``.

    Centred, then projected on the top right-singular vectors (numpy SVD; Pearson 1901). Fewer
    than 2 rows give zeros; ``d = 1`` pads the second column with zeros.
    """
    x = np.asarray(x, dtype=np.float64)
    if len(x) < 2:
        return np.zeros((len(x), 2))
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T
    if xy.shape[1] < 2:
        xy = np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
    return xy


def map_points(cat: Catalog, limit: int, seed: int = 0) -> dict[str, Any]:
    """A 2-D map of (a seeded sample of at most ``limit``) live images.

    Coordinates, clusters and outlier scores are the ones stored by ``lookalike analyze`` when
    every sampled image has them (``method: "analyze"``), else PCA of the vectors
    (``method: "pca"``). ``outlier`` is the percentile rank of the image's outlier score
    (1.0 = the most unusual), or None.

    Returns:
        ``{"method", "total" (live images), "points": [{"listing_id", "image_id", "x", "y",
        "cluster", "outlier"}]}``; an empty catalog gives no points.
    """
    if cat.model is None:
        return {"method": "pca", "total": 0, "points": []}
    cache = cat.vector_cache()
    analysis = cat.analysis()
    live = np.flatnonzero(cache.alive)
    total = len(live)
    if total > limit:
        live = np.sort(np.random.default_rng(seed).choice(live, limit, replace=False))
    keys: list[Key] = [cache.keys[r] for r in live]
    stored = [analysis.get(k, {}) for k in keys]
    if keys and all(a.get("x") is not None for a in stored):
        method = "analyze"
        xy = np.array([[a["x"], a["y"]] for a in stored], dtype=np.float64)
    else:
        method = "pca"
        xy = pca_2d(cache.vectors[live])
    scores = np.array(
        [a["outlier_score"] if a.get("outlier_score") is not None else np.nan for a in stored],
        dtype=float,
    )
    ranks = np.full(len(keys), np.nan)
    known = np.isfinite(scores)
    if known.any():
        order = np.argsort(np.argsort(scores[known]))
        ranks[known] = (order + 1) / known.sum()
    points = [
        {
            "listing_id": lid,
            "image_id": iid,
            "x": float(px),
            "y": float(py),
            "cluster": a.get("cluster"),
            "outlier": None if np.isnan(rank) else float(rank),
        }
        for (lid, iid), a, (px, py), rank in zip(keys, stored, xy, ranks, strict=True)
    ]
    return {"method": method, "total": total, "points": points}
