"""Retrieval quality on queries whose relevant listing is known: top-1, precision@k, recall@k, mAP.

Each query is ranked against every image in the catalog (image-level, exact). An image is
relevant when it belongs to the query's listing. Definitions (Manning, Raghavan & Schütze,
*Introduction to Information Retrieval*, ch. 8):

* **top-1**: fraction of queries whose best hit is relevant;
* **precision@k**: relevant hits among the first ``k``, divided by ``k``; averaged;
* **recall@k**: relevant hits among the first ``k``, divided by all relevant images; averaged;
* **AP**: mean of precision@i over the ranks ``i`` of the relevant images; **mAP** averages AP
  over queries.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .catalog import Catalog, ImageInput
from .errors import SourceError
from .images import iter_folder


@dataclass
class EvalReport:
    """Averages over ``n_queries`` queries (all in [0, 1])."""

    top1: float
    precision_at_k: float
    recall_at_k: float
    mAP: float  # noqa: N815 - the field's standard name
    n_queries: int
    k: int

    def to_dict(self) -> dict[str, float | int]:
        """JSON-ready dict: ``top1``, ``precision_at_k``, ``recall_at_k``, ``mAP``, ``n_queries``,
        ``k``."""
        items = asdict(self).items()
        return {key: (round(v, 6) if isinstance(v, float) else v) for key, v in items}


def average_precision(relevant: np.ndarray, n_relevant: int | None = None) -> float:
    """Average precision of one ranking.

    Args:
        relevant: ``(n,) bool``, ``relevant[i]`` for the hit at rank ``i + 1``.
        n_relevant: all relevant items (default: ``relevant.sum()``, i.e. a full ranking).

    Returns:
        AP in [0, 1]; 0.0 when nothing is relevant.
    """
    rel = np.asarray(relevant, dtype=bool)
    total = int(rel.sum()) if n_relevant is None else n_relevant
    if total == 0:
        return 0.0
    ranks = np.flatnonzero(rel) + 1
    return float(np.sum(np.arange(1, len(ranks) + 1) / ranks) / total)


def query_set(folder: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """``(path, relevant listing_id)`` for every image under ``folder/<listing_id>/``.

    Raises:
        SourceError: the folder holds no images.
    """
    pairs = [(s.location, s.listing_id) for s in iter_folder(Path(folder))]
    if not pairs:
        raise SourceError(f"{folder}: no query images (expected <listing_id>/<image> files)")
    return pairs


def evaluate(
    catalog: Catalog, queries: Sequence[tuple[ImageInput, str]], k: int = 10
) -> EvalReport:
    """Rank every catalog image for each query and average the metrics (module docstring).

    Args:
        catalog: the collection to evaluate.
        queries: ``(image, relevant listing_id)`` pairs.
        k: cut-off for precision@k and recall@k.

    Returns:
        The averages over ``queries``.

    Raises:
        ImageError: a query image cannot be read. QueryError: the catalog is empty.
    """
    n_images = catalog.count()
    vectors = catalog.embed([q for q, _ in queries])
    results = catalog.search_batch(vectors, k=n_images)
    assert isinstance(results, list)
    top1, p_at_k, r_at_k, ap = [], [], [], []
    for (_, listing), res in zip(queries, results, strict=True):
        rel = np.array([lid == listing for lid in res.listing_ids], dtype=bool)
        n_rel = int(rel.sum())
        top1.append(float(rel[0]) if len(rel) else 0.0)
        p_at_k.append(float(rel[:k].sum()) / k)
        r_at_k.append(float(rel[:k].sum()) / n_rel if n_rel else 0.0)
        ap.append(average_precision(rel, n_rel))
    return EvalReport(
        top1=float(np.mean(top1)),
        precision_at_k=float(np.mean(p_at_k)),
        recall_at_k=float(np.mean(r_at_k)),
        mAP=float(np.mean(ap)),
        n_queries=len(queries),
        k=k,
    )


def evaluate_baseline(
    catalog: Catalog,
    queries: Sequence[tuple[ImageInput, str]],
    extractor: str,
    k: int = 10,
    folder: str | os.PathLike[str] | None = None,
) -> EvalReport:
    """Evaluate another extractor on the same images: re-index the catalog's recorded source
    files with ``extractor`` into a temporary catalog (or ``folder``) and evaluate it there.

    Raises:
        LookalikeError: the catalog has images whose source files are not available.
    """
    import tempfile

    from .catalog import open_catalog
    from .errors import LookalikeError
    from .images import ImageSource

    sources = [ImageSource(k_[0], k_[1], src) for k_, src in catalog.sources().items() if src]
    missing = [s for s in sources if not os.path.isfile(s.location)]
    if not sources or missing:
        raise LookalikeError(
            f"the baseline needs the catalog's source files on disk ({len(missing)} missing)"
        )
    with (
        tempfile.TemporaryDirectory() as tmp,
        open_catalog(folder or Path(tmp) / "baseline", extractor=extractor) as base,
    ):
        base.index(sources)
        return evaluate(base, queries, k=k)
