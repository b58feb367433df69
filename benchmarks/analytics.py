"""Analytics at scale: k-means, kNN outliers and near-duplicate groups on 100k and 1M vectors.

Vectors are unit vectors around 1,000 random centres, with 1% planted near-duplicates (a noisy
copy of another vector, cosine about 0.9998). For each size:

* spherical k-means (faiss, k = sqrt(n / 2));
* kNN outlier scores (k = 10): with the exact engine up to ``--exact-dedup-max`` vectors
  (O(n^2) work), and always through the IVF cell join (each cell joined with its 16 nearest
  cells), with the share of images whose IVF score equals the exact one where both ran, and
  the share of 0.1% planted loners (vectors near no centre) among the top scores
  (``loners_found_*``);
* near-duplicate groups at score > 0.95: exactly (the engine's batched threshold search, O(n^2)
  work, O(n k) memory) up to ``--exact-dedup-max`` vectors, and always through the IVF cell
  join, with the share of the exact groups it finds where both ran (``ivf_groups_recall``)
  and, at every size, the share of the planted twin pairs found in one group
  (``planted_recall_*``; about n / 100 groups are expected).

Above ``--exact-dedup-max`` the exact peers are timed on a 1% sample of the images as queries
and scaled by 100 (``*_exact_est_s``: their work is linear in the number of queries).

    python benchmarks/analytics.py                       # 100k and 1M, d = 512 and 1280
    python benchmarks/analytics.py --sizes 100000:512 --json

Not a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import lookalike
from lookalike.analytics import (
    OutlierReport,
    default_k,
    kmeans,
    knn_outliers,
    near_duplicates,
    neighbours,
)
from lookalike.types import ModelInfo


def vectors(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(n, d) float32`` unit vectors around 1,000 random centres (cosine about 0.5 within a
    centre), ``(n / 100, 2)`` planted twin pairs ``(copy, original)`` (cosine about 0.9998),
    and ``n / 1000`` planted loners (positions of vectors near no centre: true outliers)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, d)).astype(np.float32)
    x = np.empty((n, d), dtype=np.float32)
    for a in range(0, n, 100_000):
        m = min(100_000, n - a)
        block = centres[rng.integers(0, 1000, m)] + rng.standard_normal((m, d), dtype=np.float32)
        x[a : a + m] = block
    dup = rng.choice(n, n // 100, replace=False)
    originals = np.setdiff1d(np.arange(n), dup)  # a copy of a copy would copy nothing
    src = originals[rng.integers(0, len(originals), len(dup))]
    x[dup] = x[src] + 0.02 * rng.standard_normal((len(dup), d), dtype=np.float32) * np.linalg.norm(
        x[src], axis=1, keepdims=True
    ) / np.sqrt(d)
    others = np.setdiff1d(originals, src)
    loners = rng.choice(others, max(1, n // 1000), replace=False)
    x[loners] = rng.standard_normal((len(loners), d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, np.stack([dup, src], axis=1), np.sort(loners)


def loners_found(report: OutlierReport, loners: np.ndarray) -> float:
    """Share of the planted loners among the ``len(loners)`` highest outlier scores."""
    top = {int(image_id) for _, image_id, _ in report.top(len(loners))}
    return len(top & set(loners.tolist())) / len(loners)


def planted_recall(groups: list[list[tuple[str, str]]], pairs: np.ndarray) -> float:
    """Share of the planted twin pairs that ended in one group."""
    group_of: dict[str, int] = {}
    for g, members in enumerate(groups):
        for _, image_id in members:
            group_of[image_id] = g
    found = [group_of.get(str(a), -1) == group_of.get(str(b), -2) for a, b in pairs.tolist()]
    return sum(found) / max(1, len(found))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--sizes",
        default="100000:512,100000:1280,1000000:512,1000000:1280",
        help="comma-separated n:d pairs",
    )
    ap.add_argument("--exact-dedup-max", type=int, default=200_000)
    ap.add_argument("--nprobe", type=int, default=None, help="IVF cells per image (default 16)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    for pair in args.sizes.split(","):
        n, d = (int(v) for v in pair.split(":"))
        x, pairs, loners = vectors(n, d)
        with tempfile.TemporaryDirectory() as tmp:
            cat = lookalike.open_catalog(Path(tmp) / "cat")
            for a in range(0, n, 100_000):
                cat.add_vectors(
                    [f"L{i // 4}" for i in range(a, min(n, a + 100_000))],
                    [str(i) for i in range(a, min(n, a + 100_000))],
                    x[a : a + 100_000],
                    model=ModelInfo("bench", "1", d),
                    normalize=False,
                )
            del x  # the catalog's cache holds the vectors now
            cat.vector_cache()
            row: dict[str, float | int | str] = {"n": n, "d": d, "k": default_k(n)}
            t0 = time.perf_counter()
            kmeans(cat)
            row["kmeans_s"] = round(time.perf_counter() - t0, 1)
            if n <= args.exact_dedup_max:
                t0 = time.perf_counter()
                knn_exact = knn_outliers(cat, k=10, save=False)
                row["knn_exact_s"] = round(time.perf_counter() - t0, 1)
                row["loners_found_exact"] = round(loners_found(knn_exact, loners), 4)
                t0 = time.perf_counter()
                exact = near_duplicates(cat, threshold=0.95)
                row["dedup_exact_s"] = round(time.perf_counter() - t0, 1)
                row["groups_exact"] = len(exact)
                row["planted_recall_exact"] = round(planted_recall(exact, pairs), 4)
            if n > args.exact_dedup_max:  # the exact peers on a 1% sample of queries, scaled
                sample = np.random.default_rng(1).choice(n, n // 100, replace=False)
                for name, k, threshold in (("knn", 11, None), ("dedup", 32, 0.95)):
                    t0 = time.perf_counter()
                    for _ in neighbours(cat, "exact", k, 512, threshold, positions=sample):
                        pass
                    row[f"{name}_exact_est_s"] = round((time.perf_counter() - t0) * 100)
            t0 = time.perf_counter()
            cat.build_index("ivf")
            row["ivf_build_s"] = round(time.perf_counter() - t0, 1)
            t0 = time.perf_counter()
            via_ivf = near_duplicates(cat, threshold=0.95, index="ivf", nprobe=args.nprobe)
            row["dedup_ivf_s"] = round(time.perf_counter() - t0, 1)
            row["groups_ivf"] = len(via_ivf)
            row["planted_recall_ivf"] = round(planted_recall(via_ivf, pairs), 4)
            t0 = time.perf_counter()
            knn_ivf = knn_outliers(cat, k=10, index="ivf", nprobe=args.nprobe, save=False)
            row["knn_ivf_s"] = round(time.perf_counter() - t0, 1)
            row["loners_found_ivf"] = round(loners_found(knn_ivf, loners), 4)
            if n <= args.exact_dedup_max:
                same = {frozenset(g) for g in exact} & {frozenset(g) for g in via_ivf}
                row["ivf_groups_recall"] = round(len(same) / max(1, len(exact)), 4)
                equal = np.abs(knn_ivf.scores - knn_exact.scores) < 1e-5
                row["knn_ivf_exact_share"] = round(float(np.mean(equal)), 4)
            cat.close()
        row["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1)
        rows.append(row)
        print(row, file=sys.stderr)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    cols = [
        "n",
        "d",
        "k",
        "kmeans_s",
        "knn_exact_s",
        "knn_exact_est_s",
        "knn_ivf_s",
        "knn_ivf_exact_share",
        "loners_found_exact",
        "loners_found_ivf",
        "dedup_exact_s",
        "dedup_exact_est_s",
        "groups_exact",
        "planted_recall_exact",
        "ivf_build_s",
        "dedup_ivf_s",
        "groups_ivf",
        "planted_recall_ivf",
        "ivf_groups_recall",
        "peak_rss_gib",
    ]
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(str(row.get(c, "-")) for c in cols))


if __name__ == "__main__":
    main()
