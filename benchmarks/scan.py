"""Exact scan speed, side by side: lookalike's kernels vs numpy vs faiss, in one run.

For each size (d, N) it builds random L2-normalized float32 vectors (the hardest case for
quantized codes: scores are concentrated, gaps between ranks are small) and random queries, and
times:

* ``numpy``: ``X @ q`` (BLAS) + ``argpartition`` for top-10; batches as ``X @ Q.T``;
* ``faiss-flat``: ``IndexFlatIP``, best of 1 and all threads, and for batches best of the
  default and a low ``distance_compute_blas_threshold`` (faiss' known 12x trap below ~250 queries);
* ``faiss-sq8``: ``IndexScalarQuantizer`` 8-bit, same thread settings;
* ``lookalike-float32|float16|int8``: ``FastEngine`` top-10 (scan + exact re-score + the
  exactness proof, so its recall@10 is 1.0 by construction);
* ``lookalike-int8-grouped-filtered``: per-listing max over 4 images per listing with a
  50 % listing filter, to show the cost of grouping and filtering inside the scan.

Bandwidth is measured in the same run (a 256 MiB streaming read on every core, alternated with
every timed call, because this shared machine's bandwidth drifts) and each row reports the
median share of it. Columns: vectors/s (rows scanned per
second), pairs/s (query x vector pairs per second), GB/s of codes read, % of bandwidth,
recall@10 against exact float32 numpy.

    python benchmarks/scan.py                 # d=512 and 1280 at N=1M, d=4096 at N=200k
    python benchmarks/scan.py --quick         # N=200k (about 2 minutes)
    python benchmarks/scan.py --json          # one JSON object per row
    python benchmarks/scan.py --sizes 512:1000000

Not a test: figures depend on the machine and on what else it runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

from lookalike.engine import VectorCache
from lookalike.engine import _kernels as kernels
from lookalike.engine.fast import FastEngine
from lookalike.types import Changes, SearchSpec

K = 10
CORES = os.cpu_count() or 1


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Bandwidth:
    """Streaming-read bandwidth of this machine (a 256 MiB read on every core).

    The machine is shared and its bandwidth drifts by 2x within minutes, so every measured row
    alternates probe and timed call, and its share of bandwidth is the median of the per-pair
    ratios."""

    def __init__(self) -> None:
        self.buf = np.ones(256 * 2**20, dtype=np.uint8)
        kernels.read_bandwidth(self.buf, CORES, 1)
        self.samples: list[float] = []

    def probe(self) -> float:
        t0 = time.perf_counter()
        kernels.read_bandwidth(self.buf, CORES, 1)
        gbps = self.buf.nbytes / (time.perf_counter() - t0) / 1e9
        self.samples.append(gbps)
        return gbps


def timed(
    fn: Callable[[], object],
    nbytes: float,
    bw: Bandwidth,
    min_time: float = 1.0,
    max_reps: int = 40,
) -> tuple[float, float, float]:
    """Median seconds of ``fn``, median share of bandwidth (reading ``nbytes`` per call), and
    the median bandwidth probed next to it (GB/s)."""
    fn()
    times, shares, probes = [], [], []
    start = time.perf_counter()
    while len(times) < max_reps and (time.perf_counter() - start < min_time or len(times) < 3):
        gbps = bw.probe()
        t0 = time.perf_counter()
        fn()
        t = time.perf_counter() - t0
        times.append(t)
        probes.append(gbps)
        shares.append(nbytes / t / 1e9 / gbps)
    return statistics.median(times), statistics.median(shares), statistics.median(probes)


def recall(found: list[np.ndarray], truth: list[np.ndarray]) -> float:
    return float(
        np.mean(
            [
                len(set(f[:K].tolist()) & set(t[:K].tolist())) / K
                for f, t in zip(found, truth, strict=True)
            ]
        )
    )


def numpy_topk(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    s = x @ q
    top = np.argpartition(s, -K)[-K:]
    return top[np.argsort(-s[top])]


def run_size(d: int, n: int, nq_single: int, bw: Bandwidth) -> list[dict]:
    rng = np.random.default_rng(d * 7 + n)
    log(f"d={d} n={n}: generating vectors")
    x = np.empty((n, d), dtype=np.float32)
    for a in range(0, n, 100_000):
        chunk = rng.standard_normal((min(100_000, n - a), d), dtype=np.float32)
        x[a : a + len(chunk)] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    queries = rng.standard_normal((64, d), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    singles = queries[:nq_single]
    truth = [numpy_topk(x, q) for q in queries]
    rows: list[dict] = []

    def measure(
        name: str,
        nq: int,
        fn: Callable[[], object],
        bytes_per_vector: float,
        rec: float,
        max_reps: int = 40,
    ) -> None:
        seconds, share, gbps_bw = timed(fn, n * bytes_per_vector, bw, max_reps=max_reps)
        gbps = n * bytes_per_vector / seconds / 1e9
        row = {
            "name": name,
            "d": d,
            "n": n,
            "nq": nq,
            "vectors_per_s": round(n / seconds),
            "pairs_per_s": round(n * nq / seconds),
            "gbps": round(gbps, 2),
            "pct_bandwidth": round(100 * share, 1),
            "bandwidth_gbps": round(gbps_bw, 1),
            "recall_at_10": round(rec, 4),
        }
        rows.append(row)
        log(
            f"  {name:<42} nq={nq:<3} {row['vectors_per_s'] / 1e6:8.1f} M vec/s "
            f"{row['pairs_per_s'] / 1e6:8.1f} M pairs/s {gbps:6.1f} GB/s "
            f"({row['pct_bandwidth']:5.1f}% of {gbps_bw:.1f}) recall@10 {rec:.4f}"
        )

    def cycling(fn: Callable[[np.ndarray], object]) -> Callable[[], object]:
        it = iter(range(10**9))
        return lambda: fn(singles[next(it) % len(singles)])

    # numpy
    measure("numpy", 1, cycling(lambda q: numpy_topk(x, q)), 4 * d, 1.0)

    def np_batch() -> np.ndarray:
        s = queries @ x.T  # (64, n): rows contiguous for argpartition
        return np.argpartition(s, -K, axis=1)[:, -K:]

    if n * 64 * 4 <= 2**31:
        measure("numpy", 64, np_batch, 4 * d, recall(list(np_batch()), truth), max_reps=3)

    # lookalike
    log("  building the vector cache")
    keys = [(f"L{i // 4:08d}", f"{i:09d}") for i in range(n)]
    cache = VectorCache(d)
    cache.apply(Changes(seq=1, upserted=keys, vectors=x, deleted=[]))
    del keys
    for codes, bpv in (("float32", 4 * d), ("float16", 2 * d), ("int8", (d + 3) // 4 * 4)):
        engine = FastEngine(cache, codes=codes)
        t0 = time.perf_counter()
        engine.table.sync(cache)
        log(f"  {codes} codes encoded in {time.perf_counter() - t0:.1f} s")
        spec = SearchSpec(k=K)
        found = [engine.search(q, spec)[0].rows for q in singles]
        measure(
            f"lookalike-{codes}",
            1,
            cycling(lambda q, e=engine, s=spec: e.search(q, s)),
            bpv,
            recall(found, truth[: len(singles)]),
        )
        found = [r.rows for r in engine.search(queries, spec)]
        measure(
            f"lookalike-{codes}",
            64,
            lambda e=engine, s=spec: e.search(queries, s),
            bpv,
            recall(found, truth),
            max_reps=10,
        )
        if codes == "int8":
            mask = np.random.default_rng(1).random(len(cache.listings)) < 0.5
            gspec = SearchSpec(k=K, group_by="listing", listing_mask=mask)
            measure(
                "lookalike-int8-grouped-filtered",
                1,
                cycling(lambda q, e=engine, s=gspec: e.search(q, s)),
                bpv,
                float("nan"),
            )
        del engine
        gc.collect()
    del cache
    gc.collect()

    # faiss
    try:
        import faiss
    except ImportError:
        log("  faiss not installed: no faiss rows")
        return rows
    for name, make, bpv in (
        ("faiss-flat", lambda: faiss.IndexFlatIP(d), 4 * d),
        (
            "faiss-sq8",
            lambda: faiss.IndexScalarQuantizer(
                d, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
            ),
            d,
        ),
    ):
        index = make()
        if not index.is_trained:
            index.train(x[: min(n, 100_000)])
        index.add(x)
        best1, best64 = None, None
        for threads in sorted({1, CORES}):  # one faiss query is slower on 2 threads than on 1
            faiss.omp_set_num_threads(threads)
            t, _, _ = timed(
                cycling(lambda q, ix=index: ix.search(q[None], K)), 0, bw, min_time=0.5, max_reps=20
            )
            if best1 is None or t < best1[0]:
                best1 = (t, threads)
        faiss.omp_set_num_threads(CORES)
        default_blas = faiss.cvar.distance_compute_blas_threshold
        for blas in (default_blas, 16):  # faiss' own scan vs BLAS for a batch of 64
            faiss.cvar.distance_compute_blas_threshold = blas
            t0 = time.perf_counter()
            index.search(queries, K)
            t = time.perf_counter() - t0
            if best64 is None or t < best64[0]:
                best64 = (t, CORES, blas)
        faiss.cvar.distance_compute_blas_threshold = default_blas
        faiss.omp_set_num_threads(best1[1])
        found = [index.search(q[None], K)[1][0] for q in singles]
        measure(
            f"{name} (threads={best1[1]})",
            1,
            cycling(lambda q, ix=index: ix.search(q[None], K)),
            bpv,
            recall(found, truth[: len(singles)]),
        )
        faiss.omp_set_num_threads(best64[1])
        faiss.cvar.distance_compute_blas_threshold = best64[2]
        found = list(index.search(queries, K)[1])
        measure(
            f"{name} (threads={best64[1]}, blas>={best64[2]})",
            64,
            lambda ix=index: ix.search(queries, K),
            bpv,
            recall(found, truth),
            max_reps=5,
        )
        del index
        gc.collect()
    faiss.omp_set_num_threads(CORES)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N = 200k only (about 2 minutes)")
    ap.add_argument("--json", action="store_true", help="one JSON object per row on stdout")
    ap.add_argument("--sizes", help="comma-separated d:n pairs, e.g. 512:1000000,1280:200000")
    args = ap.parse_args()
    sizes = (
        [(512, 200_000), (1280, 200_000)]
        if args.quick
        else [(512, 1_000_000), (1280, 1_000_000), (4096, 200_000)]
    )
    if args.sizes:
        sizes = [(int(a), int(b)) for a, b in (p.split(":") for p in args.sizes.split(","))]
    log(f"kernels: {kernels.info()}")
    bw = Bandwidth()
    log(f"memory read bandwidth ({CORES} threads): {bw.probe():.1f} GB/s")
    rows = []
    for d, n in sizes:
        rows += run_size(d, n, nq_single=32, bw=bw)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print(
        f"\nbandwidth samples: median {statistics.median(bw.samples):.1f} GB/s, "
        f"range {min(bw.samples):.1f}-{max(bw.samples):.1f}"
    )
    print(
        f"{'name':<42} {'d':>5} {'n':>9} {'nq':>3} {'M vec/s':>8} {'M pairs/s':>9} "
        f"{'GB/s':>6} {'%bw':>6} {'recall@10':>9}"
    )
    for r in rows:
        print(
            f"{r['name']:<42} {r['d']:>5} {r['n']:>9} {r['nq']:>3} "
            f"{r['vectors_per_s'] / 1e6:>8.1f} {r['pairs_per_s'] / 1e6:>9.1f} {r['gbps']:>6.1f} "
            f"{r['pct_bandwidth']:>6.1f} {r['recall_at_10']:>9.4f}"
        )


if __name__ == "__main__":
    main()
