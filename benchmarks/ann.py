"""ANN vs exact on one machine: build time, query latency and recall@10 of faiss IVF, IVF-PQ and
HNSW behind lookalike's search, against lookalike's exact int8 scan, and the collection size
above which ANN pays off (the ``index=auto`` threshold, ``catalog.ANN_AUTO_BYTES``).

Data: unit vectors drawn around 2,000 random centres (the cluster structure of real image
embeddings; uniform random vectors make every ANN index look bad and every exact scan look
good). Queries are fresh draws from the same distribution.

    python benchmarks/ann.py                  # N = 200k, d = 512
    python benchmarks/ann.py --n 50000 --json

Not a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import numpy as np

import lookalike
from lookalike.catalog import ANN_AUTO_BYTES
from lookalike.types import ModelInfo


def clustered(rng: np.random.Generator, n: int, d: int, centres: np.ndarray) -> np.ndarray:
    x = centres[rng.integers(0, len(centres), n)]
    x = x + rng.standard_normal((n, d), dtype=np.float32) / np.sqrt(d)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((2000, args.d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = clustered(rng, args.n, args.d, centres)
    queries = clustered(rng, args.queries, args.d, centres)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cat = lookalike.open_catalog(tmp + "/cat")
        for a in range(0, args.n, 50_000):
            cat.add_vectors(
                [f"L{i // 4}" for i in range(a, min(args.n, a + 50_000))],
                [str(i) for i in range(a, min(args.n, a + 50_000))],
                x[a : a + 50_000],
                model=ModelInfo("bench", "1", args.d),
            )
        exact = [set(r.image_ids) for r in cat.search(vector=queries, k=10, index="exact")]

        def run(index: str) -> dict:
            cat.search(vector=queries[0], k=10, index=index)
            times, found = [], []
            for q in queries:
                t0 = time.perf_counter()
                found.append(set(cat.search(vector=q, k=10, index=index).image_ids))
                times.append(time.perf_counter() - t0)
            ms = np.array(times) * 1e3
            recall = float(np.mean([len(f & e) / 10 for f, e in zip(found, exact, strict=True)]))
            return {
                "p50_ms": round(float(np.median(ms)), 3),
                "p99_ms": round(float(np.percentile(ms, 99)), 3),
                "recall_at_10": round(recall, 4),
            }

        rows.append({"name": "exact int8 scan", "build_s": 0.0, **run("exact")})
        print(f"exact: {rows[-1]}", file=sys.stderr)
        for kind in ("ivf", "ivfpq", "hnsw"):
            t0 = time.perf_counter()
            ann = cat.build_index(kind)
            build = time.perf_counter() - t0
            knob = (
                f"efSearch={ann.params.ef_search}"
                if kind == "hnsw"
                else f"nprobe={ann.params.nprobe}"
            )
            rows.append(
                {
                    "name": f"ann {kind} ({ann.params.factory(args.d)}, {knob})",
                    "build_s": round(build, 1),
                    **run(kind),
                }
            )
            print(f"{kind}: {rows[-1]}", file=sys.stderr)
        cat.close()
    exact_ms = rows[0]["p50_ms"]
    per_byte_ms = exact_ms / (args.n * args.d)
    threshold_rows = ANN_AUTO_BYTES / args.d
    summary = {
        "n": args.n,
        "d": args.d,
        "exact_ms_per_million_rows": round(per_byte_ms * 1e6 * args.d, 2),
        "auto_threshold_bytes": ANN_AUTO_BYTES,
        "auto_threshold_rows_at_this_d": int(threshold_rows),
        "exact_ms_at_threshold": round(per_byte_ms * ANN_AUTO_BYTES, 1),
    }
    if args.json:
        for row in rows:
            print(json.dumps({"n": args.n, "d": args.d, **row}))
        print(json.dumps(summary))
        return
    print(f"N={args.n}, d={args.d}, {args.queries} queries, k=10")
    print(f"{'engine':<62} {'build s':>8} {'p50 ms':>8} {'p99 ms':>8} {'recall@10':>9}")
    for r in rows:
        print(
            f"{r['name']:<62} {r['build_s']:>8.1f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
            f"{r['recall_at_10']:>9.4f}"
        )
    print(
        f"exact scan: {summary['exact_ms_per_million_rows']} ms per million rows at d={args.d}"
        f"; index=auto switches to ANN above {ANN_AUTO_BYTES / 1e9:.1f} GB of codes "
        f"({summary['auto_threshold_rows_at_this_d']:,} rows at this d, about "
        f"{summary['exact_ms_at_threshold']} ms per exact query)"
    )


if __name__ == "__main__":
    main()
