"""The engine at marketplace scale, through the public API and the CLI (issue 18).

Builds (or reuses) a catalog of N synthetic unit vectors through ``Catalog.add_vectors``, 4
images a listing, half the listings in stock (``stock_level`` 1 or 0), then measures:

* **ingest**: rows/s of ``add_vectors`` and listings/s of ``update_listings`` (batches of
  50,000); then a new process's first search, which builds the engine files from the store
  batch by batch and the codes (wall time and peak RSS);
* **cold**: wall time of a new process for ``lookalike stats`` and for
  ``lookalike search --vector q.npy`` (with its peak RSS), and of the API's first search;
* **warm**: median latency of ``Catalog.search`` top-10: plain, ``where="stock_level > 0"``,
  ``group_by="listing"``, and both, timed call by call in turn; the overhead of each over
  plain; the filter's own per-query cost (``parse_where(...).mask``, uncached);
* **threads**: searches/s of ``Catalog.search`` from 1, 4 and 16 threads at once (top-10,
  the same mix of queries), and the mean batch the coalescer scanned;
* **RSS** of the process with the engine loaded (and the part not backed by files).

Vectors are non-negative by default (``abs`` of Gaussian, like pooled ReLU features and HOG:
scores crowd together) or Gaussian (``--dist random``).

    python benchmarks/scale.py                      # N = 200k, d = 512 (a few minutes)
    python benchmarks/scale.py --n 1000000 --catalog /tmp/scale-1m   # build once, reuse
    python benchmarks/scale.py --catalog /tmp/scale-1m --skip-cli --threads 1,4,16
    python benchmarks/scale.py --json               # one JSON object per figure

Every figure depends on the machine and on what else it runs; compare rows of one run.
Run it with the code of another commit (``PYTHONPATH=old/src``) on the same catalog to
compare before and after. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import lookalike
from lookalike.engine import parse_where
from lookalike.types import ModelInfo

BATCH = 50_000
K = 10


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Report:
    """Figures, printed as a table (or JSON lines) at the end."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.rows: list[dict[str, object]] = []

    def add(self, name: str, value: float, unit: str, **extra: object) -> None:
        row = {"name": name, "value": round(value, 4), "unit": unit, **extra}
        self.rows.append(row)
        log(f"  {name}: {value:.4g} {unit} {extra if extra else ''}")

    def print(self) -> None:
        for row in self.rows:
            if self.as_json:
                print(json.dumps(row))
            else:
                extra = {k: v for k, v in row.items() if k not in ("name", "value", "unit")}
                more = "  " + ", ".join(f"{k}={v}" for k, v in extra.items()) if extra else ""
                print(f"{row['name']:<34} {row['value']:>12} {row['unit']:<10}{more}")


def synthetic(rng: np.random.Generator, n: int, d: int, dist: str) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    return np.abs(x) if dist == "nonneg" else x


def build(path: Path, n: int, d: int, per: int, dist: str, report: Report) -> None:
    """Write the catalog: ``n`` vectors, ``per`` a listing, odd listings out of stock."""
    rng = np.random.default_rng(0)
    model = ModelInfo("synthetic", dist, d)
    t0 = time.perf_counter()
    with lookalike.open_catalog(path) as cat:
        for a in range(0, n, BATCH):
            m = min(BATCH, n - a)
            idx = np.arange(a, a + m)
            lids = [f"L{i // per:08d}" for i in idx]
            iids = [f"L{i // per:08d}/{i % per}.jpg" for i in idx]
            cat.add_vectors(lids, iids, synthetic(rng, m, d, dist), model=model)
            log(f"  ingested {a + m:,} rows")
        ingest = time.perf_counter() - t0
        report.add("ingest add_vectors", n / ingest, "rows/s", n=n, d=d)
        t1 = time.perf_counter()
        listings = (n + per - 1) // per
        for a in range(0, listings, BATCH):
            ids = range(a, min(listings, a + BATCH))
            cat.update_listings({f"L{i:08d}": {"stock_level": (i + 1) % 2} for i in ids})
        report.add(
            "ingest update_listings",
            listings / (time.perf_counter() - t1),
            "listings/s",
            batch=BATCH,
        )
    first_load(path, d, report)


def first_load(path: Path, d: int, report: Report) -> None:
    """A new process's first search of the new catalog: the engine files are written from the
    store batch by batch and mapped, then the codes are encoded and saved (its wall time and
    peak RSS: the memory a collection larger than RAM needs)."""
    code = (
        "import time, numpy as np, lookalike\n"
        "t = time.perf_counter()\n"
        f"cat = lookalike.open_catalog({str(path)!r}, create=False)\n"
        f"cat.search(vector=np.ones({d}, np.float32), k=10)\n"
        "t1 = time.perf_counter()\n"
        "cat.engine\n"  # waits for the codes
        "t2 = time.perf_counter()\n"
        "cat.close()\n"  # the codes are saved beside the files
        "print(t1 - t, t2 - t, time.perf_counter() - t)\n"
    )
    out, _, peak, anon = run_measured([sys.executable, "-c", code])
    if out.returncode:
        raise SystemExit(f"first load failed: {out.stderr.strip()}")
    first, codes, closed = (float(x) for x in out.stdout.split()[-3:])
    report.add(
        "first load: files built + first answer",
        first,
        "s",
        peak_rss_mb=peak,
        peak_anon_mb=anon,
    )
    report.add("first load: codes built", codes, "s", saved_at_close_s=round(closed, 1))


def run_measured(cmd: list[str]) -> tuple[subprocess.CompletedProcess[str], float, int, int]:
    """Run ``cmd``; its wall time (s), peak RSS (``VmHWM``, MiB: mapped file pages read count
    too) and peak anonymous RSS (``RssAnon`` sampled every 20 ms, MiB: the memory the kernel
    cannot drop; a 10M x 512 catalog maps 25 GB of files on a 24 GB machine)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)  # files: never full
        status = Path(f"/proc/{proc.pid}/status")
        hwm = anon = 0
        while proc.poll() is None:
            try:
                fields = dict(line.split(":", 1) for line in status.read_text().splitlines())
                hwm = max(hwm, int(fields["VmHWM"].split()[0]) // 1024)
                anon = max(anon, int(fields["RssAnon"].split()[0]) // 1024)
            except (OSError, KeyError, ValueError):
                pass
            time.sleep(0.02)
        wall = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())
    return done, wall, hwm, anon


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory now, MiB (``/proc/self/status``): ``VmRSS`` in all, or
    ``RssAnon`` (not backed by a file: what the kernel cannot drop under pressure)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cold(path: Path, d: int, report: Report) -> None:
    """New processes: ``lookalike stats``, ``lookalike search --vector``, API first search."""
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        qfile = Path(tmp) / "q.npy"
        np.save(qfile, np.abs(np.random.default_rng(5).standard_normal(d)).astype(np.float32))
        cli = [sys.executable, "-m", "lookalike.cli"]
        for name, args in (
            ("cold CLI stats", ["stats", "-c", str(path)]),
            ("cold CLI search", ["search", "-c", str(path), "--vector", str(qfile), "-k", "10"]),
        ):
            out, wall, peak, anon = run_measured([*cli, *args])
            if out.returncode:
                raise SystemExit(f"{name} failed: {out.stderr.strip()}")
            report.add(name, wall, "s", peak_rss_mb=peak, peak_anon_mb=anon)
        code = (
            "import time, numpy as np, lookalike\n"
            "t = time.perf_counter()\n"
            f"cat = lookalike.open_catalog({str(path)!r}, create=False)\n"
            f"cat.search(vector=np.load({str(qfile)!r}), k=10)\n"
            "print(time.perf_counter() - t)\n"
        )
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"cold API search failed: {out.stderr.strip()}")
        report.add(
            "cold API open + first search",
            float(out.stdout.split()[-1]),
            "s",
            process_s=round(time.perf_counter() - t, 2),
        )


CASES: dict[str, dict[str, object]] = {
    "plain": {},
    "where": {"where": "stock_level > 0"},
    "group_by": {"group_by": "listing"},
    "group_by + where": {"group_by": "listing", "where": "stock_level > 0"},
}


def warm(cat: lookalike.Catalog, queries: np.ndarray, report: Report) -> None:
    """Median latency of each case, the cases timed in turn for every query."""
    for case in CASES.values():  # warm up: engine, codes, masks
        cat.search(vector=queries[0], k=K, **case)  # type: ignore[arg-type]
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for q in queries:
        for name, case in CASES.items():
            t = time.perf_counter()
            cat.search(vector=q, k=K, **case)  # type: ignore[arg-type]
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["plain"])
    for name, ts in times.items():
        med = statistics.median(ts)
        report.add(f"warm API {name}", med * 1e3, "ms", over_plain=f"{(med / base - 1):+.1%}")
    listings = cat.vector_cache().listings
    expr = parse_where("stock_level > 0")
    costs = []
    for _ in range(7):
        t = time.perf_counter()
        expr.mask(listings)
        costs.append(time.perf_counter() - t)
    med = statistics.median(costs) * 1e3
    report.add("filter mask (uncached)", med, "ms", listings=len(listings))


def threaded(
    cat: lookalike.Catalog, queries: np.ndarray, levels: list[int], report: Report
) -> None:
    """Searches/s from ``t`` threads at once, each running the queries round-robin."""
    per_thread = max(8, len(queries))

    def worker(barrier: threading.Barrier, offset: int) -> None:
        barrier.wait()
        for i in range(per_thread):
            cat.search(vector=queries[(offset + i) % len(queries)], k=K)

    for t in levels:
        stats0 = cat.coalescing() if hasattr(cat, "coalescing") else None
        barrier = threading.Barrier(t + 1)
        threads = [threading.Thread(target=worker, args=(barrier, j * 7)) for j in range(t)]
        for th in threads:
            th.start()
        barrier.wait()
        start = time.perf_counter()
        for th in threads:
            th.join()
        wall = time.perf_counter() - start
        extra: dict[str, object] = {}
        if stats0 is not None:
            stats1 = cat.coalescing()
            batches = stats1["batches"] - stats0["batches"]
            extra["mean_batch"] = round((stats1["requests"] - stats0["requests"]) / batches, 1)
        report.add(f"threads {t:>2} searches", t * per_thread / wall, "searches/s", **extra)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000, help="vectors (default 200k)")
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--per-listing", type=int, default=4)
    ap.add_argument("--dist", choices=["nonneg", "random"], default="nonneg")
    ap.add_argument("--catalog", type=Path, help="catalog folder to build once and reuse")
    ap.add_argument("--queries", type=int, default=15)
    ap.add_argument("--threads", default="1,4,16", help="thread counts ('' to skip)")
    ap.add_argument("--skip-cli", action="store_true", help="no cold CLI / API processes")
    ap.add_argument(
        "--first-load",
        action="store_true",
        help="on an existing catalog: remove its engine files and time the first load again",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    report = Report(args.json)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.catalog or Path(tmp) / "cat"
        if not (path / "catalog.db").exists():
            log(f"building {args.n:,} x {args.d} ({args.dist}) in {path}")
            build(path, args.n, args.d, args.per_listing, args.dist, report)
        elif args.first_load:
            log("first load: the engine files removed, built again from the store")
            shutil.rmtree(path / "engine", ignore_errors=True)
            first_load(path, args.d, report)
        if not args.skip_cli:
            log("cold starts")
            cold(path, args.d, report)
        log("warm")
        t = time.perf_counter()
        cat = lookalike.open_catalog(path, create=False)
        cache = cat.vector_cache()
        report.add("API vector cache load", time.perf_counter() - t, "s", rows=cache.n_rows)
        t = time.perf_counter()
        engine = cat.engine  # waits for the codes (built in the background after a load)
        report.add("API codes built", time.perf_counter() - t, "s", engine=engine.name)
        rng = np.random.default_rng(1)
        queries = synthetic(rng, args.queries, cache.dim, args.dist)
        warm(cat, queries, report)
        report.add("RSS after load", rss_mb(), "MiB", anon_mib=round(rss_mb("RssAnon")))
        levels = [int(x) for x in args.threads.split(",") if x.strip()]
        if levels:
            log("threads")
            threaded(cat, queries, levels, report)
        cat.close()
    report.print()


if __name__ == "__main__":
    main()
