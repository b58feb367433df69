"""Real-time ingest through NATS JetStream: publish-to-searchable latency and throughput.

Starts a local ``nats-server`` (JetStream, loopback, temp store) and real ``lookalike stream``
consumer processes, on the demo photos (real images, the default cnn extractor):

1. **latency**: one consumer running; images published at a steady rate (default 20/s for
   30 s); latency = the catalog's commit time of the row (``ingested_at``) minus the publish
   time (``Event-Time``), p50 and p99;
2. **throughput**: N images published first, then 1 (and then 2, with the same durable name,
   into a fresh catalog) consumers started; images/s from the first to the last commit;
3. the same images indexed with ``lookalike index`` for comparison (target: the stream within
   80 % of batch indexing);
4. lost and duplicated rows counted in every run.

    python benchmarks/stream.py            # about 3 minutes
    python benchmarks/stream.py --json     # one JSON object

Not a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import lookalike
from lookalike.demo import write_demo
from lookalike.stream.jetstream import connect, image_events, publish
from lookalike.stream.localserver import LocalNatsServer

LOOKALIKE = str(Path(sys.executable).with_name("lookalike"))


def rows(catalog: Path) -> list[tuple[str, str, float]]:
    if not (catalog / "catalog.db").exists():
        return []
    with sqlite3.connect(catalog / "catalog.db", timeout=10) as conn:
        try:
            return conn.execute("SELECT listing_id, image_id, ingested_at FROM features").fetchall()
        except sqlite3.OperationalError:
            return []


def consumer(catalog: Path, url: str, stream: str, idle: float) -> subprocess.Popen:
    subject = f"{stream.lower()}.>"
    return subprocess.Popen(
        [
            LOOKALIKE,
            "stream",
            "--catalog",
            str(catalog),
            "--nats",
            url,
            "--durable",
            stream,
            "--stream",
            stream,
            "--subject",
            subject,
            "--idle-exit",
            str(idle),
            "--format",
            "json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


async def purge(url: str, stream: str) -> None:
    """Delete the stream (and its consumers) if it exists."""
    nc = await connect(url)
    with contextlib.suppress(Exception):  # not there yet
        await nc.jetstream().delete_stream(stream)
    await nc.close()


def wait_rows(catalog: Path, n: int, timeout: float) -> list[tuple[str, str, float]]:
    deadline = time.monotonic() + timeout
    got = rows(catalog)
    while len(got) < n and time.monotonic() < deadline:
        time.sleep(0.2)
        got = rows(catalog)
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=20.0, help="images/s for the latency run")
    ap.add_argument("--seconds", type=float, default=30.0, help="length of the latency run")
    ap.add_argument("--per-listing", type=int, default=36, help="demo images per listing")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        write_demo(
            tmp / "demo", images_per_listing=args.per_listing, queries_per_listing=0, seed=11
        )
        photos = tmp / "demo" / "photos"
        events = list(image_events([photos]))
        n = len(events)
        result: dict[str, float | int] = {"images": n}
        with LocalNatsServer(tmp / "nats") as server:
            # 1. latency at a steady rate
            cat = tmp / "lat"
            lookalike.open_catalog(cat, extractor="cnn").close()
            asyncio.run(publish(server.url, "lat.in", [], stream="LAT"))  # create the stream
            proc = consumer(cat, server.url, "LAT", idle=10)
            time.sleep(4)  # model loaded, subscribed
            count = min(n, int(args.rate * args.seconds))

            async def steady() -> dict[str, float]:
                sent = {}
                nc = await connect(server.url)
                js = nc.jetstream()
                start = time.monotonic()
                for i in range(count):
                    await asyncio.sleep(max(0.0, start + i / args.rate - time.monotonic()))
                    data, headers = events[i]
                    sent[headers["Image-Id"]] = time.time()
                    await js.publish("lat.in", data, headers=headers)
                await nc.close()
                return sent

            sent = asyncio.run(steady())
            got = wait_rows(cat, count, 60)
            proc.wait(timeout=120)
            lat = np.array([t - sent[iid] for _, iid, t in got if iid in sent])
            result.update(
                p50_s=round(float(np.percentile(lat, 50)), 3),
                p99_s=round(float(np.percentile(lat, 99)), 3),
                latency_rate_per_s=args.rate,
                latency_images=count,
            )
            lost = count - len({iid for _, iid, _ in got})
            dup = len(got) - len({(lid, iid) for lid, iid, _ in got})
            # 2. throughput with 1 and 2 consumers (backlog published first)
            for consumers in (1, 2):
                # a fresh backlog (and stream) per run: the durable consumer of the first run
                # must not have eaten the second run's messages
                asyncio.run(purge(server.url, "TP"))
                asyncio.run(publish(server.url, "tp.in", events, stream="TP"))
                cat = tmp / f"tp{consumers}"
                lookalike.open_catalog(cat, extractor="cnn").close()
                procs = [consumer(cat, server.url, "TP", idle=8) for _ in range(consumers)]
                got = wait_rows(cat, n, 600)
                for p in procs:
                    p.wait(timeout=120)
                times = np.sort([t for _, _, t in got])
                first_batch = int(np.sum(times <= times[0] + 1e-6))
                rate = (len(times) - first_batch) / max(times[-1] - times[0], 1e-9)
                result[f"images_per_s_{consumers}_consumer{'s' if consumers > 1 else ''}"] = round(
                    float(rate), 1
                )
                lost += n - len({iid for _, iid, _ in got})
                dup += len(got) - len({(lid, iid) for lid, iid, _ in got})
            result.update(lost=lost, duplicated=dup)
        # 3. batch index of the same images
        with lookalike.open_catalog(tmp / "batch", extractor="cnn") as cat:
            cat.extractor.embed(np.zeros((1, 224, 224, 3), np.uint8))
            report = cat.index([photos])
        result["index_images_per_s"] = round(report.images_per_s, 1)
        result["stream_vs_index"] = round(
            float(result["images_per_s_1_consumer"]) / report.images_per_s, 2
        )
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:>26}: {value}")


if __name__ == "__main__":
    main()
