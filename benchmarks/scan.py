"""Exact scan speed, side by side: lookalike's kernels vs numpy vs faiss, in one run.

For each distribution and size it builds float32 unit vectors and queries of that distribution:

* ``random``: Gaussian (scores spread out; the easy case for quantized codes);
* ``nonneg``: absolute values of Gaussians, like pooled ReLU features and HOG: every score
  crowds into a narrow band, the hard case for the codes' error bound;
* ``clustered``: 100 offset Gaussian clusters, queries from the same clusters;
* ``cnn`` / ``hog``: real features of the demo photos (``lookalike.demo``, 14 listings x 40
  photos, 56 held-out query photos), extracted with the project's extractors. There are only
  560 of them, so the collection is *tiled*: each row is one real vector plus Gaussian noise of
  0.25 x the per-dimension standard deviation, clipped at 0 (the features are non-negative)
  and renormalized; the queries are the held-out photos' own vectors. The output says so.

and times, **alternating call by call** (every engine answers the same query in each round,
next to a bandwidth probe, because this shared machine's speed drifts; ratios between rows of
one size are therefore measured at the same moments):

* ``numpy``: ``X @ q`` (BLAS) + ``argpartition`` for top-10; batches as ``Q @ X.T``;
* ``faiss-flat``: ``IndexFlatIP`` and ``faiss-sq8``: ``IndexScalarQuantizer`` 8-bit; for one
  query the faster of 1 and all threads (one query is often slower on 2 threads) and, for
  Flat, of faiss' own scan and BLAS; for batches, for Flat, the faster of the default and a
  low ``distance_compute_blas_threshold`` (below it faiss scans without BLAS, several times
  slower on a batch of 64): each measured, not assumed;
* ``lookalike-float32|float16|int8``: ``FastEngine`` top-10 (scan + exact re-score + the
  exactness proof, so its recall@10 is 1.0 by construction), with the rows re-scored per query;
* ``lookalike-int8-grouped-filtered``: per-listing max over 4 images per listing with a
  50 % listing filter;
* ``lookalike-int8 (avx512-vnni)``: on a CPU with AMX-INT8, where the int8 batch runs on the
  tile unit, the same batch on the AVX-512 VNNI kernel, in the same race;
* ``api-*``: the public Python API: ``Catalog.add_vectors`` into a fresh SQLite catalog
  (8 images a listing, half the listings ``stock_level`` 1, half 0), then ``Catalog.search``
  with and without ``where="stock_level > 0"`` and ``group_by="listing"``, and
  ``Catalog.search_batch`` of 64 (timed next to numpy, which they are compared with).

Columns: vectors/s (rows scanned per second), pairs/s (query x vector pairs per second), GB/s
of codes read, % of the bandwidth probed next to the call, recall@10 against exact float32
numpy, rows re-scored exactly per query (lookalike rows).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/scan.py
    python benchmarks/scan.py --quick       # random + nonneg, N = 200k (under 3 minutes)
    python benchmarks/scan.py --json        # one JSON object per row
    python benchmarks/scan.py --dist nonneg,cnn --sizes 512:1000000 --api ""

(The script drops ``OPENBLAS_CORETYPE`` and ``OPENBLAS_L2_SIZE`` from its own environment
before numpy loads, so numpy's BLAS picks its kernels for this CPU.) Not a test: figures
depend on the machine and on what else it runs.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and {"OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"} & set(os.environ):
    env = {
        k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
    }
    os.execve(sys.executable, [sys.executable, *sys.argv], env)

import argparse
import gc
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import lookalike
from lookalike.engine import VectorCache
from lookalike.engine import _kernels as kernels
from lookalike.engine.fast import FastEngine
from lookalike.types import Changes, ModelInfo, SearchSpec

K = 10
NQ_BATCH = 64
CORES = os.cpu_count() or 1
DISTS = ("random", "nonneg", "clustered", "cnn", "hog")
TILE_NOISE = 0.25


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Bandwidth:
    """Streaming-read bandwidth of this machine (a 256 MiB read on every core)."""

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


def race(
    fns: dict,
    bw: Bandwidth,
    nbytes: dict,
    min_time: float = 1.0,
    max_rounds: int = 40,
    min_rounds: int = 3,
    warmup: bool = True,
) -> dict:
    """Call every function once per round (round ``i`` passes ``i``; the order rotates), next
    to one bandwidth probe. Returns, per name, the median seconds, the median share of the
    probed bandwidth (reading ``nbytes[name]`` per call) and the median probe (GB/s)."""
    names = list(fns)
    if warmup:
        for fn in fns.values():
            fn(0)
    times: dict[str, list[float]] = {name: [] for name in names}
    shares: dict[str, list[float]] = {name: [] for name in names}
    probes: list[float] = []
    start = time.perf_counter()
    i = 0
    while i < max_rounds and (
        time.perf_counter() - start < min_time * len(names) or i < min_rounds
    ):
        gbps = bw.probe()
        probes.append(gbps)
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            t0 = time.perf_counter()
            fns[name](i)
            t = time.perf_counter() - t0
            times[name].append(t)
            shares[name].append(nbytes[name] / t / 1e9 / gbps)
        i += 1
    probe = statistics.median(probes)
    return {
        name: (statistics.median(times[name]), statistics.median(shares[name]), probe)
        for name in names
    }


def topk_numpy(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    s = x @ q
    top = np.argpartition(s, -K)[-K:]
    return top[np.argsort(-s[top])]


def recall(found: list, truth: list) -> float:
    return float(
        np.mean(
            [
                len(set(list(f)[:K]) & set(t[:K].tolist())) / K
                for f, t in zip(found, truth, strict=True)
            ]
        )
    )


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------------- distributions


def real_features(name: str, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The demo photos' ``name`` vectors ``(560, d)`` and its held-out queries' ``(56, d)``."""
    from lookalike.demo import write_demo
    from lookalike.extract import get_extractor
    from lookalike.images import iter_folder, load_image

    if not (folder / "photos").exists():
        log("  writing the demo photos (14 listings x 40, 56 queries)")
        write_demo(folder, images_per_listing=40, queries_per_listing=4)
    ext = get_extractor(name)
    out = []
    for sub in ("photos", "queries"):
        sources = sorted(iter_folder(folder / sub), key=lambda s: str(s.location))
        pixels = [
            ext.preprocess(load_image(s.location, draft_size=ext.draft_size).image) for s in sources
        ]
        batch = np.stack(pixels)
        out.append(np.concatenate([ext.embed(batch[a : a + 32]) for a in range(0, len(batch), 32)]))
    log(f"  {name}: {len(out[0])} real vectors and {len(out[1])} queries, d = {out[0].shape[1]}")
    return out[0].astype(np.float32), out[1].astype(np.float32)


def make_data(
    dist: str,
    d: int,
    n: int,
    rng: np.random.Generator,
    real: dict[str, tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray, str]:
    """``(n, d)`` unit vectors, ``(NQ_BATCH, d)`` queries and a note on how they were made."""
    x = np.empty((n, d), dtype=np.float32)
    if dist in ("cnn", "hog"):
        base, queries = real[dist]
        sd = base.std(axis=0)
        for a in range(0, n, 100_000):
            m = min(100_000, n - a)
            rows = base[rng.integers(0, len(base), m)]
            noise = TILE_NOISE * sd * rng.standard_normal((m, d), dtype=np.float32)
            x[a : a + m] = unit(np.maximum(rows + noise, 0))
        q = unit(queries[np.arange(NQ_BATCH) % len(queries)])
        note = (
            f"tiled: {len(base)} real {dist} vectors of the demo photos + noise "
            f"{TILE_NOISE} x sd, clipped at 0; queries: {len(queries)} held-out photos"
        )
        return x, q, note
    centres = rng.standard_normal((100, d), dtype=np.float32) + 1.0

    def draw(m: int) -> np.ndarray:
        g = rng.standard_normal((m, d), dtype=np.float32)
        if dist == "nonneg":
            return unit(np.abs(g))
        if dist == "clustered":
            return unit(centres[rng.integers(0, len(centres), m)] + 0.5 * g)
        return unit(g)

    for a in range(0, n, 100_000):
        chunk = draw(min(100_000, n - a))
        x[a : a + len(chunk)] = chunk
    return x, draw(NQ_BATCH), dist


# ---------------------------------------------------------------------- one size


class Rows:
    """The rows of the output table for one (distribution, d, n)."""

    def __init__(self, dist: str, d: int, n: int, note: str) -> None:
        self.dist, self.d, self.n, self.note = dist, d, n, note
        self.rows: list[dict] = []

    def add(
        self,
        name: str,
        nq: int,
        timing: tuple[float, float, float],
        bytes_per_vector: float,
        rec: float,
        rescored: float | None = None,
    ) -> None:
        seconds, share, probe = timing
        n = self.n
        row = {
            "name": name,
            "dist": self.dist,
            "d": self.d,
            "n": n,
            "nq": nq,
            "vectors_per_s": round(n / seconds),
            "pairs_per_s": round(n * nq / seconds),
            "ms": round(seconds * 1e3, 2),
            "gbps": round(n * bytes_per_vector / seconds / 1e9, 2),
            "pct_bandwidth": round(100 * share, 1),
            "bandwidth_gbps": round(probe, 1),
            "recall_at_10": None if math.isnan(rec) else round(rec, 4),
            "rescored_per_query": None if rescored is None else round(rescored, 1),
        }
        if self.note != self.dist:
            row["data"] = self.note
        self.rows.append(row)
        rs = "" if rescored is None else f" rescored/q {rescored:7.1f}"
        rc = "  (exact)" if math.isnan(rec) else f" recall@10 {rec:.4f}"
        log(
            f"  {name:<40} nq={nq:<3} {row['vectors_per_s'] / 1e6:8.1f} M vec/s "
            f"{row['pairs_per_s'] / 1e6:8.1f} M pairs/s {row['ms']:9.2f} ms "
            f"({row['pct_bandwidth']:5.1f}% of {probe:.1f} GB/s){rc}{rs}"
        )


class Counted:
    """A FastEngine's rows re-scored per query over the calls made through it."""

    def __init__(self, engine: FastEngine) -> None:
        self.engine = engine
        self.mark()

    def mark(self) -> None:
        self.rescored, self.queries = self.engine.rescored, self.engine.queries

    def per_query(self) -> float:
        return (self.engine.rescored - self.rescored) / max(1, self.engine.queries - self.queries)


def faiss_indexes(x: np.ndarray, queries: np.ndarray, bw: Bandwidth) -> dict:
    """faiss IndexFlatIP and SQ8, each with the settings that measured fastest here: for one
    query 1 or all threads and (Flat) faiss' own scan or BLAS; for a batch of 64 (Flat) BLAS
    or faiss' own scan (``distance_compute_blas_threshold``: with fewer queries than it faiss
    scans itself; its default is far above 64 in recent versions)."""
    try:
        import faiss
    except ImportError:
        log("  faiss not installed: no faiss rows")
        return {}
    d = x.shape[1]
    default_blas = faiss.cvar.distance_compute_blas_threshold
    out = {}

    def searcher(index, threads: int, blas: int, batch: bool) -> Callable[[int], object]:
        def search(i: int) -> object:
            faiss.omp_set_num_threads(threads)
            faiss.cvar.distance_compute_blas_threshold = blas
            try:
                q = queries if batch else queries[i % len(queries)][None]
                return index.search(q, K)
            finally:
                faiss.cvar.distance_compute_blas_threshold = default_blas

        return search

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
            index.train(x[: min(len(x), 100_000)])
        index.add(x)
        blas_options = (default_blas, 1) if name == "faiss-flat" else (default_blas,)
        single = {
            (t, b): searcher(index, t, b, False) for t in sorted({1, CORES}) for b in blas_options
        }
        timing = race(single, bw, dict.fromkeys(single, 0.0), min_time=0.3, max_rounds=10)
        best1 = min(timing, key=lambda key: timing[key][0])
        blas_options = (default_blas, 16) if name == "faiss-flat" else (default_blas,)
        batch = {(CORES, b): searcher(index, CORES, b, True) for b in blas_options}
        timing = race(
            batch, bw, dict.fromkeys(batch, 0.0), max_rounds=1, min_rounds=1, warmup=False
        )
        best64 = min(timing, key=lambda key: timing[key][0])

        def label(key: tuple[int, int], nq: int, flat: bool = name == "faiss-flat") -> str:
            how = "BLAS" if nq >= key[1] else "own scan"
            return f"threads={key[0]}" + (f", {how}" if flat else "")

        out[name] = (single[best1], batch[best64], bpv, label(best1, 1), label(best64, NQ_BATCH))
    faiss.omp_set_num_threads(CORES)
    return out


def with_isa(isa: str, engine: FastEngine, queries: np.ndarray, spec: SearchSpec) -> list:
    """``engine.search(queries, spec)`` on the kernels of ``isa``, then back to the best."""
    kernels.set_isa(isa)
    try:
        return engine.search(queries, spec)
    finally:
        kernels.set_isa("auto")


def run_engines(
    rows: Rows, x: np.ndarray, queries: np.ndarray, truth: list, bw: Bandwidth, nq_single: int
) -> None:
    """numpy, lookalike's engines and faiss, single queries and batches, alternating."""
    n, d = x.shape
    singles = queries[:nq_single]
    log("  building the vector cache and the codes")
    keys = [(f"L{i // 4:08d}", f"{i:09d}") for i in range(n)]
    cache = VectorCache(d)
    cache.apply(Changes(seq=1, upserted=keys, vectors=x, deleted=[]))
    del keys
    engines = {}
    for codes in ("float32", "float16", "int8"):
        engine = FastEngine(cache, codes=codes)
        t0 = time.perf_counter()
        engine.scanner.sync()
        log(f"  {codes} codes encoded in {time.perf_counter() - t0:.1f} s")
        engines[codes] = engine
    faiss_ix = faiss_indexes(x, queries, bw)
    spec = SearchSpec(k=K)
    mask = np.random.default_rng(1).random(len(cache.listings)) < 0.5
    gspec = SearchSpec(k=K, group_by="listing", listing_mask=mask)
    bpv = {"numpy": 4 * d, "float32": 4 * d, "float16": 2 * d, "int8": (d + 3) // 4 * 4}

    # single queries
    fns: dict[str, Callable[[int], object]] = {
        "numpy": lambda i: topk_numpy(x, singles[i % nq_single])
    }
    nbytes = {"numpy": float(n * bpv["numpy"])}
    for codes, engine in engines.items():
        fns[codes] = lambda i, e=engine: e.search(singles[i % nq_single], spec)
        nbytes[codes] = float(n * bpv[codes])
    fns["grouped"] = lambda i, e=engines["int8"]: e.search(singles[i % nq_single], gspec)
    nbytes["grouped"] = float(n * bpv["int8"])
    for name, (one, _, fbpv, _, _) in faiss_ix.items():
        fns[name] = one
        nbytes[name] = float(n * fbpv)
    timing = race(fns, bw, nbytes)
    rows.add("numpy", 1, timing["numpy"], bpv["numpy"], 1.0)
    for codes, engine in engines.items():
        counter = Counted(engine)
        found = [engine.search(q, spec)[0].rows for q in singles]
        rescored = counter.per_query()
        rec = recall(found, truth[:nq_single])
        rows.add(f"lookalike-{codes}", 1, timing[codes], bpv[codes], rec, rescored)
    rows.add("lookalike-int8-grouped-filtered", 1, timing["grouped"], bpv["int8"], float("nan"))
    for name, (_, _, fbpv, t1, _) in faiss_ix.items():
        found = [faiss_ix[name][0](i)[1][0] for i in range(nq_single)]  # type: ignore[index]
        rows.add(f"{name} ({t1})", 1, timing[name], fbpv, recall(found, truth[:nq_single]))

    # batches of 64
    fns = {}
    if n * NQ_BATCH * 4 <= 2**31:
        fns["numpy"] = lambda i: np.argpartition(queries @ x.T, -K, axis=1)[:, -K:]
    for codes, engine in engines.items():
        fns[codes] = lambda i, e=engine: e.search(queries, spec)
    # on an AMX CPU the int8 batch uses tiles; the same race also times the VNNI kernel
    vnni = "avx512-amx" in kernels.isas()
    if vnni:
        fns["int8-vnni"] = lambda i, e=engines["int8"]: with_isa("avx512-vnni", e, queries, spec)
    for name, (_, many, _, _, _) in faiss_ix.items():
        fns[name] = many
    nbytes = {k: float(n * bpv.get(k, d)) for k in fns}
    if vnni:
        nbytes["int8-vnni"] = nbytes["int8"]
    timing = race(fns, bw, nbytes, min_time=0.0, max_rounds=3, warmup=False)
    if "numpy" in timing:
        top = np.argpartition(queries @ x.T, -K, axis=1)[:, -K:]
        rows.add("numpy", NQ_BATCH, timing["numpy"], bpv["numpy"], recall(list(top), truth))
    for codes, engine in engines.items():
        counter = Counted(engine)
        found = [r.rows for r in engine.search(queries, spec)]
        rescored = counter.per_query()
        rows.add(
            f"lookalike-{codes}",
            NQ_BATCH,
            timing[codes],
            bpv[codes],
            recall(found, truth),
            rescored,
        )
    if vnni:
        found = [r.rows for r in with_isa("avx512-vnni", engines["int8"], queries, spec)]
        name = "lookalike-int8 (avx512-vnni)"
        rows.add(name, NQ_BATCH, timing["int8-vnni"], bpv["int8"], recall(found, truth))
    for name, (_, many, fbpv, _, t64) in faiss_ix.items():
        found = list(many(0)[1])  # type: ignore[index]
        rows.add(f"{name} ({t64})", NQ_BATCH, timing[name], fbpv, recall(found, truth))
    del engines, fns, faiss_ix, cache
    gc.collect()


def run_api(
    rows: Rows, x: np.ndarray, queries: np.ndarray, truth: list, bw: Bandwidth, nq_single: int
) -> None:
    """The public API: add_vectors into a fresh catalog, then search / search_batch, timed
    next to numpy."""
    n, d = x.shape
    singles = queries[:nq_single]
    per_listing = 8
    with (
        tempfile.TemporaryDirectory() as tmp,
        lookalike.open_catalog(Path(tmp) / "cat", extractor="hog") as cat,
    ):
        model = ModelInfo(f"bench-{rows.dist}", "1", d)
        t0 = time.perf_counter()
        step = 50_000
        for a in range(0, n, step):
            b = min(n, a + step)
            lids = [f"L{i // per_listing:08d}" for i in range(a, b)]
            cat.add_vectors(lids, [f"{i:09d}" for i in range(a, b)], x[a:b], model=model)
        log(f"  api: add_vectors of {n} rows in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        for li in range((n + per_listing - 1) // per_listing):
            cat.update_listing(f"L{li:08d}", stock_level=li % 2)
        listings = (n + per_listing - 1) // per_listing
        log(f"  api: stock_level of {listings} listings in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        cat.search(vector=singles[0], k=K)
        t = time.perf_counter() - t0
        log(f"  api: first search (loads the cache, encodes the codes) {t:.1f} s")
        engine = cat.engine
        variants = {
            "api-search": {},
            "api-search-where": {"where": "stock_level > 0"},
            "api-search-group": {"group_by": "listing"},
            "api-search-group-where": {"group_by": "listing", "where": "stock_level > 0"},
        }
        bpv = (d + 3) // 4 * 4 if engine.code_kind == "int8" else 4 * d
        fns: dict[str, Callable[[int], object]] = {
            "numpy": lambda i: topk_numpy(x, singles[i % nq_single])
        }
        for name, opts in variants.items():
            fns[name] = lambda i, o=opts: cat.search(vector=singles[i % nq_single], k=K, **o)
        timing = race(
            fns, bw, {name: float(n * (4 * d if name == "numpy" else bpv)) for name in fns}
        )
        rows.add("numpy (next to api)", 1, timing["numpy"], 4 * d, 1.0)
        counter = Counted(engine) if isinstance(engine, FastEngine) else None
        found = [[int(h.image_id) for h in cat.search(vector=q, k=K).hits] for q in singles]
        rescored = counter.per_query() if counter else None
        rows.add(
            "api-search", 1, timing["api-search"], bpv, recall(found, truth[:nq_single]), rescored
        )
        for name in list(variants)[1:]:
            rows.add(name, 1, timing[name], bpv, float("nan"))
        fns = {
            "numpy": lambda i: np.argpartition(queries @ x.T, -K, axis=1)[:, -K:],
            "api-search_batch": lambda i: cat.search_batch(queries, k=K),
        }
        nbytes = {"numpy": float(n * 4 * d), "api-search_batch": float(n * bpv)}
        timing = race(fns, bw, nbytes, min_time=0.0, max_rounds=3, warmup=False)
        rows.add("numpy (next to api)", NQ_BATCH, timing["numpy"], 4 * d, 1.0)
        if counter:
            counter.mark()
        found = [[int(h.image_id) for h in r.hits] for r in cat.search_batch(queries, k=K)]
        rescored = counter.per_query() if counter else None
        rec = recall(found, truth)
        rows.add("api-search_batch", NQ_BATCH, timing["api-search_batch"], bpv, rec, rescored)
    gc.collect()


def run_size(
    dist: str, d: int, n: int, bw: Bandwidth, real: dict, api: bool, nq_single: int = 32
) -> list[dict]:
    rng = np.random.default_rng(d * 7 + n)
    log(f"\n{dist} d={d} n={n}: generating vectors")
    x, queries, note = make_data(dist, d, n, rng, real)
    if note != dist:
        log(f"  data: {note}")
    truth = [topk_numpy(x, q) for q in queries]
    rows = Rows(dist, d, n, note)
    run_engines(rows, x, queries, truth, bw, nq_single)
    if api:
        run_api(rows, x, queries, truth, bw, nq_single)
    return rows.rows


def ratios(rows: list[dict]) -> str:
    """lookalike-int8's speed over numpy and each faiss index (1 query), over the best peer
    (batch of 64), and the API rows' over numpy timed next to them."""

    def speed(name: str, nq: int) -> float | None:
        found = [
            r["pairs_per_s"] for r in rows if r["name"].split(" (")[0] == name and r["nq"] == nq
        ]
        return found[0] if found else None

    parts = []
    ours = speed("lookalike-int8", 1)
    for peer in ("numpy", "faiss-flat", "faiss-sq8"):
        theirs = speed(peer, 1)
        if ours and theirs:
            parts.append(f"x{ours / theirs:.2f} {peer}")
    ours = speed("lookalike-int8", NQ_BATCH)
    peers = [v for v in (speed(p, NQ_BATCH) for p in ("numpy", "faiss-flat", "faiss-sq8")) if v]
    if ours and peers:
        parts.append(f"batch x{ours / max(peers):.2f} best peer")
    api = speed("api-search", 1)
    base = [r["pairs_per_s"] for r in rows if r["name"] == "numpy (next to api)" and r["nq"] == 1]
    if api and base:
        parts.append(f"api-search x{api / base[0]:.2f} numpy")
    return ", ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="random + nonneg at N = 200k (< 3 minutes)"
    )
    ap.add_argument("--json", action="store_true", help="one JSON object per row on stdout")
    ap.add_argument("--dist", help=f"comma-separated distributions of {','.join(DISTS)}")
    ap.add_argument("--sizes", help="comma-separated d:n pairs, e.g. 512:1000000,4096:200000")
    ap.add_argument(
        "--real-n", type=int, default=200_000, help="rows of the tiled cnn/hog sets (default 200k)"
    )
    ap.add_argument("--api", help="distributions that also get the public-API rows ('' for none)")
    args = ap.parse_args()
    dists = (args.dist or ("random,nonneg" if args.quick else ",".join(DISTS))).split(",")
    unknown = set(dists) - set(DISTS)
    if unknown:
        ap.error(f"unknown --dist {', '.join(sorted(unknown))}; use {', '.join(DISTS)}")
    sizes = [(512, 200_000)] if args.quick else [(512, 1_000_000)]
    if args.sizes:
        sizes = [(int(a), int(b)) for a, b in (p.split(":") for p in args.sizes.split(","))]
    api_dists = set(
        (args.api if args.api is not None else ("nonneg" if args.quick else "random,nonneg")).split(
            ","
        )
    )
    log(f"kernels: {kernels.info()}")
    bw = Bandwidth()
    log(f"memory read bandwidth ({CORES} threads): {bw.probe():.1f} GB/s")
    real: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for dist in dists:
            if dist in ("cnn", "hog"):
                real[dist] = real_features(dist, Path(tmp) / "demo")
                d = real[dist][0].shape[1]
                for n in sorted({min(n, args.real_n) for _, n in sizes}):
                    out += run_size(dist, d, n, bw, real, dist in api_dists)
            else:
                for d, n in sizes:
                    out += run_size(dist, d, n, bw, real, dist in api_dists)
    if args.json:
        for row in out:
            print(json.dumps(row))
        return
    print(
        f"\nbandwidth samples: median {statistics.median(bw.samples):.1f} GB/s, "
        f"range {min(bw.samples):.1f}-{max(bw.samples):.1f}"
    )
    print(
        f"{'dist':<9} {'name':<44} {'d':>5} {'n':>8} {'nq':>3} {'M vec/s':>8} {'M pairs/s':>9} "
        f"{'ms':>8} {'%bw':>6} {'recall':>7} {'rescored/q':>10}"
    )
    for r in out:
        rec = "(exact)" if r["recall_at_10"] is None else f"{r['recall_at_10']:.4f}"
        rs = "" if r["rescored_per_query"] is None else f"{r['rescored_per_query']:.1f}"
        print(
            f"{r['dist']:<9} {r['name']:<44} {r['d']:>5} {r['n']:>8} {r['nq']:>3} "
            f"{r['vectors_per_s'] / 1e6:>8.1f} {r['pairs_per_s'] / 1e6:>9.1f} {r['ms']:>8.2f} "
            f"{r['pct_bandwidth']:>6.1f} {rec:>7} {rs:>10}"
        )
    print("\nratios (same race, median times): lookalike-int8 against its peers")
    for dist, d, n in dict.fromkeys((r["dist"], r["d"], r["n"]) for r in out):
        same = [r for r in out if (r["dist"], r["d"], r["n"]) == (dist, d, n)]
        print(f"  {dist} d={d} n={n}: {ratios(same)}")
    notes = {r["dist"]: r["data"] for r in out if "data" in r}
    for dist, note in notes.items():
        print(f"{dist}: {note}")


if __name__ == "__main__":
    main()
