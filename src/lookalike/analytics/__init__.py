"""Analytics on the stored feature vectors: clusters, outliers, near-duplicates, a 2-D map.

All of it reads the catalog's in-RAM vector cache (live rows only) through the public catalog
API and writes per-image results to the catalog's analysis columns, where the HTTP ``/map``
and the web page's Explore view read them. One module per concern:

* :mod:`.neighbours`: live vectors, the batched kNN / threshold loop over an engine
  (:func:`neighbours`), the blocked IVF cell join (:func:`cell_blocks`);
* :mod:`.clusters`: :func:`kmeans`, spherical k-means (faiss), cluster id and distance per
  image, a representative (the image nearest its centroid) per cluster;
* :mod:`.outliers`: :func:`knn_outliers` / :func:`isolation_outliers`, an outlier score per
  image;
* :mod:`.dedup`: :func:`near_duplicate_report` / :func:`near_duplicates`, groups of images
  with ``score > t`` or verified by :mod:`.verify` (connected components; no ``n x n``
  matrix), and :func:`exact_duplicates` by file hash;
* :mod:`.verify`: :func:`~.verify.same_photo`, two thumbnails' SIFT keypoints under one
  RANSAC similarity transform (crops and rotations that the cosine misses);
* :mod:`.bands`: :func:`score_bands`, the readable band of a score ("same image", "near copy",
  "similar", "unrelated");
* :mod:`.calibrate`: :func:`calibrate`, the near-duplicate threshold measured on edited copies
  of the catalog's own images, and :func:`near_duplicate_threshold`, the one ``dedup`` uses;
* :mod:`.projection`: :func:`project`, 2-D PCA (always) or UMAP (when ``umap-learn`` is
  installed), :func:`map_points` for ``GET /map``, :func:`render_map_png`.

This package re-exports the public functions of those modules.
"""

from __future__ import annotations

from .bands import BANDS, ScoreBands, score_bands
from .calibrate import Calibration, calibrate, near_duplicate_threshold
from .clusters import Cluster, ClusterReport, default_k, kmeans
from .dedup import DedupReport, UnionFind, exact_duplicates, near_duplicate_report, near_duplicates
from .neighbours import JOIN_NPROBE, cell_blocks, ivf_index, live_vectors, neighbours
from .outliers import OutlierReport, isolation_outliers, knn_outliers
from .projection import map_points, pca_2d, project, render_map_png

__all__ = [
    "BANDS",
    "JOIN_NPROBE",
    "Calibration",
    "Cluster",
    "ClusterReport",
    "DedupReport",
    "OutlierReport",
    "ScoreBands",
    "UnionFind",
    "calibrate",
    "cell_blocks",
    "default_k",
    "exact_duplicates",
    "isolation_outliers",
    "ivf_index",
    "kmeans",
    "knn_outliers",
    "live_vectors",
    "map_points",
    "near_duplicate_report",
    "near_duplicate_threshold",
    "near_duplicates",
    "neighbours",
    "pca_2d",
    "project",
    "render_map_png",
    "score_bands",
]
