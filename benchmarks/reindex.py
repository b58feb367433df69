"""Reindex speed: ``reindex`` (hog -> cnn) of the demo photos against ``index`` of the same
photos with cnn in the same run (images/s and their ratio), and the swap transaction alone on
a synthetic store (the seconds writers wait; readers never wait), SQLite and, with
``--postgres``, a local PostgreSQL cluster started by this script.

    python benchmarks/reindex.py                         # 336 photos; swap of 200,000 x 512
    python benchmarks/reindex.py --per-listing 12 --rows 50000 --rounds 3 --postgres

Rounds alternate index and reindex on fresh copies, so both meet the same load of this shared
machine; the figures are the median round. Not a test.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import lookalike
from lookalike.demo import write_demo
from lookalike.store import ReindexRow, open_store
from lookalike.store.localpg import LocalPostgres
from lookalike.types import FeatureBatch, ModelInfo


def index_cnn(photos: Path, catalog: Path) -> float:
    """images/s of ``index`` with cnn (decode worker processes, one per core)."""
    with lookalike.open_catalog(catalog, extractor="cnn", device="cpu") as cat:
        report = cat.index([photos])
    return report.images_per_s


def reindex_cnn(hog_catalog: Path, catalog: Path) -> tuple[float, float]:
    """``(images/s, seconds after the swap)`` of ``reindex`` hog -> cnn of a copy."""
    shutil.copytree(hog_catalog, catalog)
    with lookalike.open_catalog(catalog, device="cpu") as cat:
        t0 = time.perf_counter()
        report = cat.reindex("cnn")
        total = time.perf_counter() - t0
    assert report.status == "swapped", report.summary()
    return report.reindexed / total, total


def swap_seconds(location: str, rows: int, dim: int, batch: int = 10_000) -> dict[str, float]:
    """Seconds of the store's steps for ``rows`` synthetic rows: write the second generation,
    and the swap transaction."""
    rng = np.random.default_rng(0)
    store = open_store(location)
    store.claim_model(ModelInfo("bench", "1", dim))
    for a in range(0, rows, batch):
        m = min(batch, rows - a)
        x = rng.standard_normal((m, dim)).astype(np.float32)
        keys = [f"{i:09d}" for i in range(a, a + m)]
        store.upsert(FeatureBatch([k[:6] for k in keys], keys, x, keys))
    target = ModelInfo("bench", "2", dim)
    store.reindex_begin(target)
    t0 = time.perf_counter()
    while todo := store.reindex_todo(limit=batch):
        x = rng.standard_normal((len(todo), dim)).astype(np.float32)
        store.reindex_write(
            [ReindexRow(t.listing_id, t.image_id, t.seq, x[i]) for i, t in enumerate(todo)]
        )
    written = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = store.reindex_swap(target)
    swap = time.perf_counter() - t0
    assert out.swapped and store.model() == target
    store.close()
    return {"second_generation_s": round(written, 2), "swap_s": round(swap, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-listing", type=int, default=24, help="demo variants per photo")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows", type=int, default=200_000, help="rows of the swap benchmark")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--postgres", action="store_true", help="the swap on PostgreSQL too")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_demo(root / "demo", images_per_listing=args.per_listing, queries_per_listing=0)
        photos = root / "demo" / "photos"
        n = sum(1 for _ in photos.rglob("*.jpg"))
        with lookalike.open_catalog(root / "hog", extractor="hog") as cat:
            cat.index([photos])
        index_rates, reindex_rates, totals = [], [], []
        for r in range(args.rounds):
            index_rates.append(index_cnn(photos, root / f"index-{r}"))
            rate, total = reindex_cnn(root / "hog", root / f"reindex-{r}")
            reindex_rates.append(rate)
            totals.append(total)
        idx, rei = statistics.median(index_rates), statistics.median(reindex_rates)
        print(f"photos: {n}, rounds: {args.rounds}")
        print(f"index cnn:            {idx:7.1f} images/s")
        print(f"reindex hog -> cnn:   {rei:7.1f} images/s  ({rei / idx:.2f}x index, same run)")
        print(f"reindex wall time:    {statistics.median(totals):7.1f} s (swap and follow-up in)")
        stores = {"sqlite": lambda: str(root / "swap")}
        if args.postgres:
            pg = LocalPostgres(root / "pg").start()
            stores["postgresql"] = lambda: pg.create_database("swap")
        try:
            for name, location in stores.items():
                steps = swap_seconds(location(), args.rows, args.dim)
                print(
                    f"{name}, {args.rows} x {args.dim}: second generation written in "
                    f"{steps['second_generation_s']} s, swap transaction {steps['swap_s']} s"
                )
        finally:
            if args.postgres:
                pg.stop()


if __name__ == "__main__":
    main()
