"""HTTP search latency and throughput: ``POST /search`` with an image upload, 1 / 4 / 16
concurrent clients, against ``lookalike serve`` on loopback.

The catalog holds 10,000 images: the 84 real demo photos plus 9,916 random unit vectors under
the same cnn model (so every request embeds a real uploaded photo with the real model, then
scans 10 k vectors). Each level runs a bounded number of requests (``--requests``, at most
``--seconds``); the server is a separate process started by this script and stopped at the end.

    python benchmarks/serve.py
    python benchmarks/serve.py --json

Not a test: figures depend on the machine (2 cores: the model competes with the clients).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200, help="requests per concurrency level")
    ap.add_argument("--seconds", type=float, default=60.0, help="time cap per level")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
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
        port = free_port()
        server = subprocess.Popen(
            [LOOKALIKE, "serve", "--catalog", str(tmp / "cat"), "--port", str(port), *QUIET],
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            with httpx.Client(timeout=60) as c:  # warm up: model, codes
                for q in queries[:4]:
                    c.post(url + "/search", files={"image": ("q.jpg", q, "image/jpeg")})
            rows = []
            for clients in (1, 4, 16):
                latencies: list[float] = []
                stop_at = time.monotonic() + args.seconds

                def worker(i: int, latencies=latencies, stop_at=stop_at, clients=clients) -> None:
                    with httpx.Client(timeout=60) as c:
                        j = i
                        while len(latencies) < args.requests and time.monotonic() < stop_at:
                            q = queries[j % len(queries)]
                            j += clients
                            t0 = time.perf_counter()
                            r = c.post(
                                url + "/search",
                                data={"k": "10", "group_by": "listing"},
                                files={"image": ("q.jpg", q, "image/jpeg")},
                            )
                            r.raise_for_status()
                            latencies.append(time.perf_counter() - t0)

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
        finally:
            server.terminate()
            server.wait(timeout=30)
    if args.json:
        for row in rows:
            print(json.dumps({"catalog_images": 10_000, **row}))
        return
    print("POST /search, image upload, 10,000-image catalog, k=10 grouped by listing")
    print(f"{'clients':>8} {'requests':>9} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>7}")
    for r in rows:
        print(
            f"{r['clients']:>8} {r['requests']:>9} {r['p50_ms']:>8} {r['p99_ms']:>8} "
            f"{r['requests_per_s']:>7}"
        )


if __name__ == "__main__":
    main()
