"""Spark jobs on one machine: how they scale with executor cores, and what they cost against
the local (embedded) path on the same data.

* extraction: ``spark.extract`` of the demo photos (cnn, ONNX Runtime per Python worker) at
  ``local[1]`` and ``local[2]``, against ``Catalog.index`` with the same number of workers;
* exact search: ``spark.search`` (k = 10, a batch of queries) over N random vectors in the lake
  layout at ``local[1]`` and ``local[2]``, against the local engine warm (vectors in memory)
  and cold (read the Parquet files, build the cache, search).

    python benchmarks/spark.py                     # N = 1,000,000, d = 512, 280 images
    python benchmarks/spark.py --n 200000 --json

Spark pays fixed costs per job (scheduling, Python workers, Arrow transfer), so on one machine
it is the slower path; the figures say how much, and how much a second core gives back. Not a
test: figures vary with the machine; the README quotes a run on the build machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import lookalike
from lookalike import spark as lsp
from lookalike.demo import write_demo
from lookalike.engine import NumpyEngine, VectorCache
from lookalike.extract import l2_normalize
from lookalike.images import iter_folder
from lookalike.lake import (
    column_vectors,
    features_schema,
    part_of,
    vectors_column,
    write_model_sidecar,
)
from lookalike.types import Changes, ModelInfo, SearchSpec


def write_lake(folder: Path, x: np.ndarray, parts: int) -> list[tuple[str, str]]:
    """N random vectors as a lake (one file per part, like ``lookalike export``)."""
    n, d = x.shape
    model = ModelInfo("random", "1", d)
    listing = [f"L{i // 4:08d}" for i in range(n)]
    image = [f"{i:09d}" for i in range(n)]
    by_part: dict[int, list[int]] = {}
    for i, lid in enumerate(listing):
        by_part.setdefault(part_of(lid, parts), []).append(i)
    schema = features_schema(d, model)
    for p, idx in sorted(by_part.items()):
        m = len(idx)
        table = pa.table(
            {
                "listing_id": [listing[i] for i in idx],
                "image_id": [image[i] for i in idx],
                "vector": vectors_column(x[idx]),
                "model": ["random:1"] * m,
                "source": [None] * m,
                "sha256": [None] * m,
                "width": pa.nulls(m, pa.int32()),
                "height": pa.nulls(m, pa.int32()),
                "ingested_at": [0.0] * m,
                "labels": [None] * m,
            },
            schema=schema,
        )
        out = folder / "features" / f"part={p}"
        out.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out / "data.parquet")
    write_model_sidecar(folder, model)
    return list(zip(listing, image, strict=True))


def local_cold(folder: Path, q: np.ndarray, k: int) -> float:
    """Read the lake's Parquet files, build the engine's cache, search; seconds."""
    t0 = time.perf_counter()
    table = pq.read_table(folder / "features", columns=["listing_id", "image_id", "vector"])
    d = q.shape[1]
    x = column_vectors(table.column("vector"), d)
    keys = list(
        zip(
            table.column("listing_id").to_pylist(),
            table.column("image_id").to_pylist(),
            strict=True,
        )
    )
    order = sorted(range(len(keys)), key=keys.__getitem__)
    cache = VectorCache(d)
    cache.apply(Changes(seq=1, upserted=[keys[i] for i in order], vectors=x[order], deleted=[]))
    NumpyEngine(cache).search(q, SearchSpec(k=k))
    return time.perf_counter() - t0


def local_warm(folder: Path, q: np.ndarray, k: int) -> float:
    """The same vectors already in the engine's memory: best of 3 searches; seconds."""
    d = q.shape[1]
    table = pq.read_table(folder / "features", columns=["vector"])
    cache = VectorCache(d)
    cache.apply(
        Changes(
            seq=1,
            upserted=[("L", f"{i:09d}") for i in range(table.num_rows)],
            vectors=column_vectors(table.column("vector"), d),
            deleted=[],
        )
    )
    engine = NumpyEngine(cache)
    return timed(lambda: engine.search(q, SearchSpec(k=k)), 3)


def timed(fn, repeats: int) -> float:
    """Best of ``repeats`` wall-clock seconds (the first call also warms the Python workers)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="vectors in the search lake")
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--queries", type=int, default=16, help="queries per search job")
    ap.add_argument("--parts", type=int, default=16)
    ap.add_argument("--per-listing", type=int, default=20, help="demo images per listing")
    ap.add_argument("--json", action="store_true", help="one JSON object per row")
    args = ap.parse_args()
    cores = [1, 2] if (os.cpu_count() or 1) >= 2 else [1]
    rows: list[dict] = []

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        # ---- extraction
        write_demo(tmp / "demo", images_per_listing=args.per_listing, queries_per_listing=0, seed=1)
        sources = list(iter_folder(tmp / "demo" / "photos"))
        with open(tmp / "manifest.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["listing_id", "image_id", "path"])
            for s in sources:
                w.writerow([s.listing_id, s.image_id, s.location])
        for c in cores:
            with lookalike.open_catalog(tmp / f"cat{c}") as cat:
                cat.extractor.embed(np.zeros((1, 224, 224, 3), np.uint8))
                t0 = time.perf_counter()
                report = cat.index([tmp / "demo" / "photos"], workers=c)
                s = time.perf_counter() - t0
            rows.append(
                {
                    "job": "extract cnn",
                    "runner": f"local index, {c} worker(s)",
                    "items": report.added,
                    "seconds": round(s, 2),
                    "per_s": round(report.added / s, 1),
                }
            )
        for c in cores:
            spark = lsp.session(f"local[{c}]", conf={"spark.default.parallelism": str(c)})
            lsp.extract(
                spark, str(tmp / "manifest.csv"), str(tmp / "warm"), parts=c, batch_rows=32
            )  # Python workers + model loaded once per worker
            t0 = time.perf_counter()
            counts = lsp.extract(
                spark,
                str(tmp / "manifest.csv"),
                str(tmp / f"lake{c}"),
                parts=args.parts,
                batch_rows=32,
            )
            s = time.perf_counter() - t0
            spark.stop()
            rows.append(
                {
                    "job": "extract cnn",
                    "runner": f"spark local[{c}]",
                    "items": counts["images"],
                    "seconds": round(s, 2),
                    "per_s": round(counts["images"] / s, 1),
                }
            )

        # ---- search
        rng = np.random.default_rng(0)
        x = l2_normalize(rng.standard_normal((args.n, args.d), dtype=np.float32))
        q = rng.standard_normal((args.queries, args.d), dtype=np.float32)
        write_lake(tmp / "vectors", x, args.parts)
        del x
        cold = local_cold(tmp / "vectors", l2_normalize(q), 10)
        rows.append(
            {
                "job": f"search {args.queries}q k=10",
                "runner": "local engine, cold",
                "items": args.n,
                "seconds": round(cold, 2),
                "per_s": round(args.n * args.queries / cold),
            }
        )
        warm = local_warm(tmp / "vectors", l2_normalize(q), 10)
        rows.append(
            {
                "job": f"search {args.queries}q k=10",
                "runner": "local engine, warm",
                "items": args.n,
                "seconds": round(warm, 3),
                "per_s": round(args.n * args.queries / warm),
            }
        )
        for c in cores:
            spark = lsp.session(f"local[{c}]")
            s = timed(lambda spark=spark: lsp.search(spark, str(tmp / "vectors"), q, k=10), 2)
            spark.stop()
            rows.append(
                {
                    "job": f"search {args.queries}q k=10",
                    "runner": f"spark local[{c}]",
                    "items": args.n,
                    "seconds": round(s, 2),
                    "per_s": round(args.n * args.queries / s),
                }
            )

    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print(f"{'job':<18} {'runner':<28} {'items':>9} {'seconds':>8} {'per s':>12}")
    for row in rows:
        print(
            f"{row['job']:<18} {row['runner']:<28} {row['items']:>9} {row['seconds']:>8} "
            f"{row['per_s']:>12}"
        )


if __name__ == "__main__":
    main()
