"""``lookalike bench``: search latency and ANN recall@10 on a catalog's own vectors.

Queries are stored vectors picked at random (seeded). Every engine answers the same queries
one at a time; rows report p50/p99 latency in milliseconds and recall@10 against the exact
answer (1.0 for the exact engines by construction: they are checked, not assumed).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .catalog import Catalog
from .engine import CODES, NumpyEngine, SearchEngine, kernels_available, make_engine
from .engine.ann import ANN_KINDS
from .types import SearchSpec


def _run(
    engine: SearchEngine, queries: np.ndarray, spec: SearchSpec
) -> tuple[list[float], list[np.ndarray]]:
    """Search ``(nq, d)`` queries one at a time after one warm-up search.

    Returns:
        ``(seconds per query, result rows per query)``.
    """
    engine.search(queries[0], spec)  # warm up (codes, indexes)
    times: list[float] = []
    rows: list[np.ndarray] = []
    for q in queries:
        t0 = time.perf_counter()
        rows.append(engine.search(q, spec)[0].rows)
        times.append(time.perf_counter() - t0)
    return times, rows


def bench_catalog(
    cat: Catalog, n_queries: int = 100, k: int = 10, seed: int = 0
) -> list[dict[str, Any]]:
    """Latency and recall@k of every available engine and built ANN index on ``cat``.

    Args:
        n_queries: stored vectors used as queries (seeded sample, at most the live count).
        k: hits per query.
        seed: seed of the query sample.

    Returns:
        One dict per engine: ``name``, ``p50_ms``, ``p99_ms`` (milliseconds), ``recall_at_k``
        (against the first engine, exact numpy), ``k``, ``n`` (live vectors), ``d``,
        ``queries``.

    Raises:
        QueryError: the catalog is empty.
    """
    cache = cat.vector_cache()
    live = np.flatnonzero(cache.alive)
    rng = np.random.default_rng(seed)
    pick = rng.choice(live, size=min(n_queries, len(live)), replace=False)
    queries = np.ascontiguousarray(cache.vectors[pick])
    spec = SearchSpec(k=k)
    engines: list[tuple[str, SearchEngine]] = [("exact numpy", NumpyEngine(cache))]
    if kernels_available()[0]:
        engines += [(f"exact fast {c}", make_engine(cache, "fast", codes=c)) for c in CODES]
    for kind in ANN_KINDS:
        eng = cat.ann_engine(kind)
        if eng is not None:
            engines.append((f"ann {kind}", eng))
    truth: list[np.ndarray] = []
    out = []
    for name, engine in engines:
        times, rows = _run(engine, queries, spec)
        if not truth:
            truth = rows
        recall = float(
            np.mean(
                [
                    len(set(r.tolist()) & set(t.tolist())) / max(1, len(t))
                    for r, t in zip(rows, truth, strict=True)
                ]
            )
        )
        ms = np.array(times) * 1e3
        out.append(
            {
                "name": name,
                "p50_ms": round(float(np.percentile(ms, 50)), 3),
                "p99_ms": round(float(np.percentile(ms, 99)), 3),
                "recall_at_k": round(recall, 4),
                "k": k,
                "n": int(cache.n_alive),
                "d": cache.dim,
                "queries": len(queries),
            }
        )
    return out
