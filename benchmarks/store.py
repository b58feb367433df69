"""Store throughput: bulk ingest (rows/s) and cold engine load (seconds) for N vectors,
SQLite (embedded) vs PostgreSQL (a local cluster started by this script, binary COPY).

    python benchmarks/store.py                 # N = 1,000,000, d = 512
    python benchmarks/store.py --n 200000 --json

The local PostgreSQL runs with fsync off (a benchmark cluster, like the tests'); SQLite runs
in WAL mode with synchronous=NORMAL, as lookalike always does. Not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lookalike.engine import VectorCache
from lookalike.store import open_store
from lookalike.store.localpg import LocalPostgres
from lookalike.types import FeatureBatch, ModelInfo


def run(location: str, x: np.ndarray, batch: int) -> dict[str, float]:
    store = open_store(location)
    store.claim_model(ModelInfo("bench", "1", x.shape[1]))
    n = len(x)
    t0 = time.perf_counter()
    for a in range(0, n, batch):
        m = min(batch, n - a)
        store.upsert(
            FeatureBatch(
                [f"L{i // 4:08d}" for i in range(a, a + m)],
                [f"{i:09d}" for i in range(a, a + m)],
                x[a : a + m],
                [f"{i:064x}" for i in range(a, a + m)],
            )
        )
    ingest = time.perf_counter() - t0
    store.close()
    store = open_store(location)  # a fresh process would do the same: read everything
    t0 = time.perf_counter()
    cache = VectorCache(x.shape[1])
    cache.apply(store.changes_since(0))
    load = time.perf_counter() - t0
    assert cache.n_alive == n
    store.close()
    return {
        "ingest_rows_per_s": round(n / ingest),
        "ingest_s": round(ingest, 1),
        "cold_load_s": round(load, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--batch", type=int, default=10_000, help="rows per transaction")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.n, args.d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append({"store": "sqlite", **run(str(Path(tmp) / "cat"), x, args.batch)})
        print(rows[-1], file=sys.stderr)
        with LocalPostgres(Path(tmp) / "pg") as pg:
            url = pg.create_database("bench")
            rows.append({"store": "postgresql", **run(url, x, args.batch)})
            print(rows[-1], file=sys.stderr)
    if args.json:
        for row in rows:
            print(json.dumps({"n": args.n, "d": args.d, **row}))
        return
    print(f"N = {args.n:,}, d = {args.d}, {args.batch:,} rows per transaction")
    print(f"{'store':<12} {'ingest rows/s':>14} {'ingest s':>9} {'cold load s':>12}")
    for r in rows:
        print(
            f"{r['store']:<12} {r['ingest_rows_per_s']:>14,} {r['ingest_s']:>9} "
            f"{r['cold_load_s']:>12}"
        )


if __name__ == "__main__":
    main()
