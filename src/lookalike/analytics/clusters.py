"""Clusters of the stored vectors: spherical k-means (faiss), a representative per cluster.

Owns :func:`kmeans` and its report (:class:`ClusterReport`, :class:`Cluster`) and the default
number of clusters (:func:`default_k`); writes ``cluster`` and ``cluster_distance`` per image
to the catalog's analysis columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..catalog import Catalog
from ..errors import LookalikeError
from ..types import Key
from .neighbours import live_vectors


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
        clusters: the non-empty clusters, largest first.
    """

    k: int
    keys: list[Key]
    assignments: np.ndarray
    distances: np.ndarray
    clusters: list[Cluster] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON contract: ``{"k", "clusters": [{"id", "size", "representative",
        "listing_id"}]}``."""
        return {
            "k": self.k,
            "clusters": [
                {
                    "id": c.id,
                    "size": c.size,
                    "representative": c.representative,
                    "listing_id": c.representative_listing,
                }
                for c in self.clusters
            ],
        }


def kmeans(
    cat: Catalog, k: int | None = None, niter: int = 25, seed: int = 0, save: bool = True
) -> ClusterReport:
    """Spherical k-means of the live vectors with faiss (inner product on unit vectors).

    faiss trains on at most 256 points per centroid (a seeded sample), then assigns every
    live image to its nearest centroid.

    Args:
        k: clusters; default :func:`default_k`.
        niter: k-means iterations.
        seed: seed of the training sample and the initial centroids.
        save: store cluster id and distance per image in the analysis columns.

    Returns:
        The assignment of every live image (order of the vector cache) and the clusters.

    Raises:
        LookalikeError: fewer than 2 vectors, or ``k`` larger than the collection.
    """
    import faiss

    keys, x = live_vectors(cat)
    n = len(keys)
    if n < 2:
        raise LookalikeError("clustering needs at least 2 vectors")
    k = default_k(n) if k is None else k
    if not 1 <= k <= n:
        raise LookalikeError(f"k must be between 1 and {n} (the number of vectors), got {k}")
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=niter,
        seed=seed,
        spherical=True,
        max_points_per_centroid=256,
        min_points_per_centroid=1,
        verbose=False,
    )
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
        cat.save_analysis(keys, {"cluster": assign.tolist(), "cluster_distance": dist.tolist()})
    return ClusterReport(k, keys, assign, dist, clusters)
