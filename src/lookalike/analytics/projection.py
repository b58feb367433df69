"""2-D maps of a collection: PCA (numpy SVD) or UMAP, the sampled map the web page shows,
and the PNG scatter of ``lookalike analyze map --png``.

Owns :func:`pca_2d` (the one PCA of the project: used by ``lookalike analyze map`` through
:func:`project` and by the HTTP ``GET /map`` through :func:`map_points`), :func:`project`
(writes ``x``, ``y`` per image to the catalog's analysis columns) and :func:`render_map_png`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..catalog import Catalog
from ..errors import LookalikeError, optional_import
from ..types import Key
from .neighbours import live_vectors


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


def project(
    cat: Catalog, method: str = "pca", save: bool = True, seed: int = 0
) -> tuple[list[Key], np.ndarray, str]:
    """2-D coordinates of every live image: PCA (:func:`pca_2d`), or UMAP (McInnes et al.,
    2018; cosine metric) when ``method="umap"`` and ``umap-learn`` is installed (else PCA,
    reported in the result).

    Args:
        method: ``"pca"`` or ``"umap"``.
        save: store ``x`` and ``y`` per image in the analysis columns.
        seed: UMAP's random state.

    Returns:
        ``(keys, (n, 2) float32, method used)``, in the order of the live images.

    Raises:
        QueryError: the catalog is empty.
    """
    keys, x = live_vectors(cat)
    used = "pca"
    xy: np.ndarray
    if method == "umap":
        try:
            import umap

            xy = umap.UMAP(n_components=2, metric="cosine", random_state=seed).fit_transform(x)
            used = "umap"
        except ImportError:
            method = "pca"
    if used == "pca":
        xy = pca_2d(x)
    xy = np.asarray(xy, dtype=np.float32)
    if save:
        cat.save_analysis(keys, {"x": xy[:, 0].tolist(), "y": xy[:, 1].tolist()})
    return keys, xy, used


def render_map_png(path: str, cat: Catalog, outliers_top: int = 10) -> dict[str, Any]:
    """Draw the stored map (computing PCA if none) as a PNG scatter coloured by cluster, the
    ``outliers_top`` highest outlier scores circled in red (matplotlib, Agg backend).

    Args:
        path: the PNG file to write.
        outliers_top: how many of the highest stored outlier scores to circle.

    Returns:
        What was drawn: ``{"points", "clusters", "outliers_marked", "png"}``.

    Raises:
        LookalikeError: the catalog is empty.
    """
    matplotlib = optional_import("matplotlib", "plot", "drawing the map as a PNG")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    analysis = cat.analysis()
    keys, _ = live_vectors(cat)
    if not keys:
        raise LookalikeError("the catalog is empty")
    if any(analysis.get(k, {}).get("x") is None for k in keys):
        project(cat)
        analysis = cat.analysis()
    xy = np.array([[analysis[k]["x"], analysis[k]["y"]] for k in keys])
    clusters = np.array(
        [analysis[k].get("cluster") if analysis[k].get("cluster") is not None else -1 for k in keys]
    )
    scores = np.array(
        [
            analysis[k].get("outlier_score")
            if analysis[k].get("outlier_score") is not None
            else np.nan
            for k in keys
        ],
        dtype=float,
    )
    fig, ax = plt.subplots(figsize=(9, 7), dpi=110)
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=clusters, cmap="tab20", s=18, alpha=0.85, linewidths=0)
    marked = 0
    if np.isfinite(scores).any():
        top = np.argsort(-np.nan_to_num(scores, nan=-np.inf))[:outliers_top]
        ax.scatter(
            xy[top, 0],
            xy[top, 1],
            s=110,
            facecolors="none",
            edgecolors="red",
            linewidths=1.6,
            label=f"top {len(top)} outliers",
        )
        marked = len(top)
        ax.legend(loc="best")
    n_clusters = len(set(clusters.tolist()) - {-1})
    ax.set_title(
        f"{len(keys)} images, {n_clusters} clusters (colour), 2-D projection of the feature vectors"
    )
    ax.set_xticks([])
    ax.set_yticks([])
    if n_clusters:
        fig.colorbar(sc, ax=ax, label="cluster")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return {"points": len(keys), "clusters": n_clusters, "outliers_marked": marked, "png": path}
