"""Analytics at scale: k-means and near-duplicate grouping time on 100k and 1M vectors.

Vectors are unit vectors around random centres, with 1% planted near-duplicates (a noisy copy
of another vector). For each size: spherical k-means (faiss, k = sqrt(n / 2)), kNN outlier
scores (exact engine, k = 10), and near-duplicate groups at score > 0.95, exactly (the
engine's batched threshold search, O(n^2) work, O(n k) memory) up to ``--exact-dedup-max``
vectors and through an IVF index above it.

    python benchmarks/analytics.py                       # 100k x 512, 100k x 1280, 1M x 512
    python benchmarks/analytics.py --sizes 100000:512 --json

Not a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import lookalike
from lookalike import ModelInfo
from lookalike.analytics import default_k, kmeans, knn_outliers, near_duplicates


def vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, d)).astype(np.float32)
    x = np.empty((n, d), dtype=np.float32)
    for a in range(0, n, 100_000):
        m = min(100_000, n - a)
        block = centres[rng.integers(0, 1000, m)] + rng.standard_normal((m, d), dtype=np.float32)
        x[a : a + m] = block
    dup = rng.choice(n, n // 100, replace=False)
    src = rng.integers(0, n, len(dup))
    x[dup] = x[src] + 0.02 * rng.standard_normal((len(dup), d), dtype=np.float32) * np.linalg.norm(
        x[src], axis=1, keepdims=True
    ) / np.sqrt(d)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--sizes", default="100000:512,100000:1280,1000000:512", help="comma-separated n:d pairs"
    )
    ap.add_argument("--exact-dedup-max", type=int, default=200_000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    for pair in args.sizes.split(","):
        n, d = (int(v) for v in pair.split(":"))
        x = vectors(n, d)
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
            cat._sync()
            row: dict[str, float | int | str] = {"n": n, "d": d, "k": default_k(n)}
            t0 = time.perf_counter()
            kmeans(cat)
            row["kmeans_s"] = round(time.perf_counter() - t0, 1)
            if n <= args.exact_dedup_max:
                t0 = time.perf_counter()
                knn_outliers(cat, k=10)
                row["knn_outliers_s"] = round(time.perf_counter() - t0, 1)
            index = "exact"
            t0 = time.perf_counter()
            if n > args.exact_dedup_max:
                index = "ivf"
                cat.build_index("ivf")
                row["ivf_build_s"] = round(time.perf_counter() - t0, 1)
                t0 = time.perf_counter()
            groups = near_duplicates(cat, threshold=0.95, index=index)
            row["dedup_index"] = index
            row["dedup_s"] = round(time.perf_counter() - t0, 1)
            row["dedup_groups"] = len(groups)
            cat.close()
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
        "knn_outliers_s",
        "ivf_build_s",
        "dedup_index",
        "dedup_s",
        "dedup_groups",
    ]
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(str(row.get(c, "-")) for c in cols))


if __name__ == "__main__":
    main()
