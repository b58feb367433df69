"""HTTP search latency and throughput: ``POST /search`` with an image upload, 1 / 4 / 16
concurrent clients, against ``lookalike serve`` on loopback; and with ``--vector-catalog``,
vector queries (JSON ``{"vector": [...]}``, top-10) at 1 / 4 / 16 / 64 clients against a large
catalog, where concurrent searches are scanned together (``engine/coalesce.py``).

The image catalog holds 10,000 images: the 84 real demo photos plus 9,916 random unit vectors
under the same cnn model (so every request embeds a real uploaded photo with the real model,
then scans 10 k vectors). Each level runs a bounded number of requests (``--requests``, at most
``--seconds``); the server is a separate process started by this script and stopped at the end.

    python benchmarks/serve.py
    python benchmarks/serve.py --json
    python benchmarks/scale.py --n 1000000 --catalog /tmp/scale-1m     # once: build it
    python benchmarks/serve.py --skip-images --vector-catalog /tmp/scale-1m

Not a test: figures depend on the machine (2 cores: the model competes with the clients).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

import lookalike
from lookalike.demo import write_demo

LOOKALIKE = str(Path(sys.executable).with_name("lookalike"))


#: The server's access log would print a line per request.
QUIET = ["--no-access-log"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(catalog: Path) -> Iterator[str]:
    """``lookalike serve`` on a free loopback port for the block; yields its URL."""
    port = free_port()
    server = subprocess.Popen(
        [LOOKALIKE, "serve", "--catalog", str(catalog), "--port", str(port), *QUIET],
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def levels(
    url: str,
    clients_levels: list[int],
    call: Callable[[httpx.Client, int], httpx.Response],
    requests: int,
    seconds: float,
) -> list[dict[str, Any]]:
    """Latency and throughput of ``call(client, j)`` (request number ``j``) from each number
    of concurrent clients."""
    rows = []
    for clients in clients_levels:
        latencies: list[float] = []
        stop_at = time.monotonic() + seconds

        def worker(i: int, latencies=latencies, stop_at=stop_at, clients=clients) -> None:
            with httpx.Client(base_url=url, timeout=120) as c:
                j = i
                while len(latencies) < requests and time.monotonic() < stop_at:
                    t0 = time.perf_counter()
                    call(c, j).raise_for_status()
                    latencies.append(time.perf_counter() - t0)
                    j += clients

        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(worker, range(clients)))
        wall = time.perf_counter() - t0
        ms = np.array(latencies) * 1e3
        rows.append(
            {
                "clients": clients,
                "requests": len(latencies),
                "p50_ms": round(float(np.percentile(ms, 50)), 1),
                "p99_ms": round(float(np.percentile(ms, 99)), 1),
                "requests_per_s": round(len(latencies) / wall, 1),
            }
        )
        print(rows[-1], file=sys.stderr)
    return rows


def image_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """POST /search with an uploaded demo photo, 10,000-image cnn catalog, 1 / 4 / 16 clients."""
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        write_demo(tmp / "demo")
        with lookalike.open_catalog(tmp / "cat", extractor="cnn") as cat:
            cat.index([tmp / "demo" / "photos"])
            rng = np.random.default_rng(0)
            n = 10_000 - cat.stats()["images"]
            cat.add_vectors(
                [f"rand-{i // 4}" for i in range(n)],
                [f"r{i}" for i in range(n)],
                rng.standard_normal((n, 1280)).astype(np.float32),
            )
        queries = [p.read_bytes() for p in sorted((tmp / "demo" / "queries").rglob("*.jpg"))]

        def call(c: httpx.Client, j: int) -> httpx.Response:
            q = queries[j % len(queries)]
            return c.post(
                "/search",
                data={"k": "10", "group_by": "listing"},
                files={"image": ("q.jpg", q, "image/jpeg")},
            )

        with serving(tmp / "cat") as url:
            with httpx.Client(base_url=url, timeout=60) as c:  # warm up: model, codes
                for j in range(4):
                    call(c, j)
            rows = levels(url, [1, 4, 16], call, args.requests, args.seconds)
    return [{"catalog_images": 10_000, **row} for row in rows]


def vector_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """POST /search with a JSON vector (top-10) against ``--vector-catalog``."""
    catalog = args.vector_catalog
    with lookalike.open_catalog(catalog, create=False) as cat:
        facts = cat.stats()
    d, n = facts["model"]["dim"], facts["images"]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, d)).astype(np.float32)
    if facts["model"]["version"] == "nonneg":  # benchmarks/scale.py's catalogs
        x = np.abs(x)
    # encoded once: the clients share the server's 2 cores, so JSON-encoding 512 numbers per
    # request in the client would take CPU from the server being measured
    bodies = [
        json.dumps({"vector": [round(float(v), 6) for v in row], "k": 10}).encode() for row in x
    ]
    headers = {"content-type": "application/json"}

    def call(c: httpx.Client, j: int) -> httpx.Response:
        return c.post("/search", content=bodies[j % len(bodies)], headers=headers)

    with serving(catalog) as url:
        with httpx.Client(base_url=url, timeout=600) as c:  # warm up: engine load, codes
            call(c, 0)
            deadline = time.monotonic() + 600
            # a new server answers with numpy while it builds its codes: wait for them
            while c.get("/stats").json().get("engine") == "numpy" and time.monotonic() < deadline:
                time.sleep(0.5)
                call(c, 0)
            # then the check of the mapped engine files runs in the background for a few
            # seconds (a digest of every byte): keep searching until it is over
            end = time.monotonic() + args.warmup
            while time.monotonic() < end:
                call(c, 0)
        clients = [int(v) for v in args.vector_clients.split(",")]
        rows = levels(url, clients, call, args.requests, args.seconds)
    return [{"catalog_images": n, "query": "vector", **row} for row in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200, help="requests per concurrency level")
    ap.add_argument("--seconds", type=float, default=60.0, help="time cap per level")
    ap.add_argument("--vector-catalog", type=Path, help="also run vector queries against it")
    ap.add_argument("--vector-clients", default="1,4,16,64")
    ap.add_argument(
        "--warmup", type=float, default=15.0, help="seconds of searches before the vector rows"
    )
    ap.add_argument("--skip-images", action="store_true", help="only the vector rows")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = [] if args.skip_images else image_rows(args)
    vrows = vector_rows(args) if args.vector_catalog else []
    if args.json:
        for row in rows + vrows:
            print(json.dumps(row))
        return
    header = f"{'clients':>8} {'requests':>9} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>7}"
    for title, table in (
        ("POST /search, image upload, 10,000-image catalog, k=10 grouped by listing", rows),
        (
            f"POST /search, JSON vector, {vrows[0]['catalog_images'] if vrows else 0:,}-image"
            " catalog, k=10",
            vrows,
        ),
    ):
        if not table:
            continue
        print(title)
        print(header)
        for r in table:
            print(
                f"{r['clients']:>8} {r['requests']:>9} {r['p50_ms']:>8} {r['p99_ms']:>8} "
                f"{r['requests_per_s']:>7}"
            )


if __name__ == "__main__":
    main()
