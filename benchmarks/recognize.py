"""Real-time recognition: publish -> match event latency at a steady rate into a large catalog.

Starts a local ``nats-server`` (JetStream, loopback, temp store) and a real ``lookalike stream
--match`` consumer process over a cnn catalog of N vectors: the demo's real photos (indexed)
plus N synthetic non-negative unit vectors (``Catalog.add_vectors``; real CNN features are
non-negative too, so scores crowd into a band as they do on real data), with 100 watchlist
entries (half of them demo photos, half synthetic vectors). The synthetic vectors are added in
chunks while the consumer runs, each chunk followed by one image it must match, so the
consumer's vector cache grows incrementally (a cold start would read the whole catalog at
once, twice its size in memory).

Then images are published at a steady rate (default 20/s): 90 % re-posts of the demo photos
under new keys (each must give one match event: its original is in the catalog; the watched
ones also give a watchlist event) and 10 % JPEGs of random shapes (must give none). Every image
is published through NATS and embedded by the consumer with the real model. Reported:
publish -> event received p50 / p99 (match events on ``lookalike.matches``, watchlist events on
``lookalike.watch.<name>``), events lost (expected, never received), duplicates (event ids the
``LOOKALIKE_MATCHES`` stream accepted twice), false events (for the shapes), and the cost
of the watchlist check per write batch (32 images, 100 entries) next to the batch's store
write. The peer, in the same run: the same load through a consumer that does not match
(ingest only), publish -> row stored p50 / p99; the machine is shared, so read the match
latency against it.

    python benchmarks/recognize.py --quick            # 100k vectors, 30 s
    python benchmarks/recognize.py                    # 1M vectors, 60 s (~12 GB of RAM)
    python benchmarks/recognize.py --vectors 300000 --json

Not a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import lookalike
from lookalike.catalog import match_event_id
from lookalike.demo import write_demo
from lookalike.images import sha256_hex
from lookalike.stream.jetstream import connect
from lookalike.stream.localserver import LocalNatsServer
from lookalike.stream.messages import make_headers
from lookalike.stream.recognition import default_match_threshold

LOOKALIKE = str(Path(sys.executable).with_name("lookalike"))
CHUNK = 50_000


def shapes_jpeg(seed: int) -> bytes:
    """A JPEG of random coloured shapes and lines over a random gradient: like nothing in the
    catalog, and unlike each other (random-noise images all look alike to a CNN: cosine
    ~0.98)."""
    from PIL import ImageDraw

    r = np.random.default_rng(seed)

    def colour() -> tuple[int, ...]:
        return tuple(int(x) for x in r.integers(0, 256, 3))

    w, h = int(r.integers(240, 400)), int(r.integers(200, 320))
    a, b = np.array(colour(), np.float32), np.array(colour(), np.float32)
    ramp = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
    im = Image.fromarray(np.broadcast_to(a + (b - a) * ramp, (h, w, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(int(r.integers(5, 30))):
        x0, y0 = int(r.integers(0, w)), int(r.integers(0, h))
        x1, y1 = x0 + int(r.integers(5, w // 2)), y0 + int(r.integers(5, h // 2))
        kind = int(r.integers(0, 4))
        if kind == 0:
            draw.rectangle([x0, y0, x1, y1], fill=colour())
        elif kind == 1:
            draw.ellipse([x0, y0, x1, y1], fill=colour())
        elif kind == 2:
            draw.line([x0, y0, x1, y1], fill=colour(), width=int(r.integers(1, 12)))
        else:
            pts = [(int(r.integers(0, w)), int(r.integers(0, h))) for _ in range(3)]
            draw.polygon(pts, fill=colour())
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def synthetic(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """``(n, d) float32`` non-negative unit vectors (a ReLU of Gaussians, then normalized)."""
    x = np.maximum(rng.standard_normal((n, d), dtype=np.float32), 0)
    x += 1e-3
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class Listener:
    """Core subscriptions to the event subjects: first-receive time per event id."""

    def __init__(self) -> None:
        self.first: dict[str, float] = {}
        self.received = Counter[str]()
        self.nc = None

    async def start(self, url: str) -> None:
        self.nc = await connect(url)

        async def on(msg) -> None:
            eid = (msg.headers or {}).get("Nats-Msg-Id", "")
            self.received[eid] += 1
            self.first.setdefault(eid, time.time())

        await self.nc.subscribe("lookalike.matches", cb=on)
        await self.nc.subscribe("lookalike.watch.>", cb=on)
        await self.nc.flush()

    async def wait_for(self, ids: set[str], timeout: float, quiet: float | None = None) -> None:
        """Until every id arrived, ``timeout`` seconds passed, or (with ``quiet``) no event
        came for ``quiet`` seconds (the consumer is done: what is missing is lost)."""
        deadline = time.monotonic() + timeout
        seen, last = len(self.first), time.monotonic()
        while not ids <= self.first.keys() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            if len(self.first) != seen:
                seen, last = len(self.first), time.monotonic()
            elif quiet is not None and time.monotonic() - last > quiet:
                return


async def stored_counts(url: str, stream: str) -> Counter[str]:
    """``Nats-Msg-Id`` -> how many messages the stream holds with it."""
    nc = await connect(url)
    js = nc.jetstream()
    sub = await js.pull_subscribe(">", stream=stream)
    out = Counter[str]()
    while True:
        try:
            got = await sub.fetch(500, timeout=1)
        except Exception:
            break
        for m in got:
            out[(m.headers or {}).get("Nats-Msg-Id", "")] += 1
    await nc.close()
    return out


def watch_cost(cat: lookalike.Catalog, d: int, rounds: int = 20) -> dict[str, float]:
    """Microseconds of the watchlist check of one 32-image write batch (``watch_matches``:
    the watch-sequence read and one ``(32, d) x (d, entries)`` product), and of the batch's
    whole write (``add_vectors``: checks, the watchlist check, one transaction) with the
    watchlists and without them, alternated round by round (medians)."""
    rng = np.random.default_rng(5)
    v = synthetic(rng, 32, d)
    keys = [("cost", f"cost/{i}") for i in range(32)]
    shas = [sha256_hex(row.tobytes()) for row in v]
    check = []
    for _ in range(200):
        t0 = time.perf_counter()
        cat.watch_matches(keys, shas, v)
        check.append(time.perf_counter() - t0)
    entries = cat.watch_entries()
    names = sorted({e.name for e in entries})
    timed: dict[str, list[float]] = {"with": [], "without": []}
    for r in range(rounds):
        for mode in ("without", "with"):
            if mode == "without":
                for name in names:
                    cat.watch_remove(name)
            else:
                for name in names:
                    mine = [e for e in entries if e.name == name]
                    cat.watch_add(
                        name,
                        np.stack([e.vector for e in mine]),
                        [e.entry_id for e in mine],
                        mine[0].threshold,
                    )
            cat.watch_matches(keys, shas, v)  # the catalog re-reads the watchlists, untimed
            t0 = time.perf_counter()
            cat.add_vectors([k[0] for k in keys], [f"{mode}{r}/{k[1]}" for k in keys], v)
            timed[mode].append(time.perf_counter() - t0)
    return {
        "watch_check_us_per_batch": round(float(np.median(check)) * 1e6, 1),
        "batch_write_with_watchlists_us": round(float(np.median(timed["with"])) * 1e6, 1),
        "batch_write_without_watchlists_us": round(float(np.median(timed["without"])) * 1e6, 1),
    }


async def steady(
    url: str,
    args: argparse.Namespace,
    photos: list[Path],
    watched: set[str],
    listener: Listener | None,
    prefix: str = "arr",
) -> dict[str, Any]:
    """Publish ``rate x seconds`` images at a steady rate (9 in 10 re-posts of demo photos, 1
    in 10 random shapes) under keys ``<prefix>-<i>``; with a listener, wait for the events
    expected, until 30 s pass without one (the consumer has caught up: what is missing is
    lost). Returns the publish times by match event id (``sent``), by watchlist
    event id (``watch``), the event ids of the shapes (``noise``), and by image key
    (``keys``)."""
    nc = await connect(url)
    js = nc.jetstream()
    total = int(args.rate * args.seconds)
    sent: dict[str, float] = {}
    watch_sent: dict[str, float] = {}
    by_key: dict[tuple[str, str], float] = {}
    noise_ids = set()
    start = time.monotonic()
    for i in range(total):
        await asyncio.sleep(max(0.0, start + i / args.rate - time.monotonic()))
        lid = f"{prefix}-{i}"
        if i % 10 == 9:
            data, iid = shapes_jpeg(i), f"{lid}/shapes.jpg"
        else:
            p = photos[i % len(photos)]
            data, iid = p.read_bytes(), f"{lid}/{p.name}"
        t = time.time()
        await js.publish("images.in", data, headers=make_headers("image", lid, iid))
        eid = match_event_id(lid, iid, sha256_hex(data), None)
        by_key[(lid, iid)] = t
        if i % 10 == 9:
            noise_ids.add(eid)
            continue
        sent[eid] = t
        if f"{p.parent.name}/{p.name}" in watched:
            watch_sent[match_event_id(lid, iid, sha256_hex(data), "demo")] = t
    if listener is not None:
        await listener.wait_for(set(sent) | set(watch_sent), 1800, quiet=30)
        await asyncio.sleep(1.0)
    await nc.close()
    return {"sent": sent, "watch": watch_sent, "noise": noise_ids, "keys": by_key}


def peer(
    url: str, cat_path: Path, args: argparse.Namespace, photos: list[Path], tmp: Path
) -> dict[str, float]:
    """The peer of the same run: the same images at the same rate into the same catalog
    through a consumer that does not match (ingest only); publish -> row stored (the row's
    ``ingested_at``) p50 / p99."""
    cmd = [LOOKALIKE, "stream", "--catalog", str(cat_path), "--nats", url, "--no-relay"]
    with (tmp / "peer.err").open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        try:
            got = asyncio.run(steady(url, args, photos, set(), None, prefix="peer"))
            keys = got["keys"]
            stored: dict[tuple[str, str], float] = {}
            last, seen = time.monotonic(), 0
            while len(stored) < len(keys) and time.monotonic() - last < 30:
                time.sleep(0.5)
                with sqlite3.connect(cat_path / "catalog.db", timeout=30) as conn:
                    rows = conn.execute(  # a key range: the primary key's index answers it
                        "SELECT listing_id, image_id, ingested_at FROM features "
                        "WHERE listing_id >= 'peer-' AND listing_id < 'peer.'"
                    ).fetchall()
                stored = {(r[0], r[1]): r[2] for r in rows}
                if len(stored) != seen:
                    last, seen = time.monotonic(), len(stored)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    lat = np.array([stored[k] - t for k, t in keys.items() if k in stored])
    if not len(lat):
        return {"peer_lost": len(keys)}
    span = max(stored.values()) - min(keys.values())
    return {
        "peer_ingest_only_p50_s": round(float(np.percentile(lat, 50)), 3),
        "peer_ingest_only_p99_s": round(float(np.percentile(lat, 99)), 3),
        "peer_rows_per_s": round(len(stored) / max(span, 1e-9), 1),
        "peer_lost": len(keys) - len(stored),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vectors", type=int, default=1_000_000, help="synthetic vectors")
    ap.add_argument("--rate", type=float, default=20.0, help="images published per second")
    ap.add_argument("--seconds", type=float, default=60.0, help="length of the run")
    ap.add_argument("--watch", type=int, default=100, help="watchlist entries")
    ap.add_argument("--quick", action="store_true", help="100k vectors, 30 s")
    ap.add_argument(
        "--no-peer",
        dest="peer",
        action="store_false",
        help="skip the peer run (the same load through a consumer that does not match)",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.vectors, args.seconds = min(args.vectors, 100_000), min(args.seconds, 30.0)
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        write_demo(tmp / "demo", queries_per_listing=0)
        photos = sorted((tmp / "demo" / "photos").rglob("*.jpg"))
        cat_path = tmp / "cat"
        cat = lookalike.open_catalog(cat_path, extractor="cnn")
        cat.index([tmp / "demo" / "photos"])
        d = cat.model.dim
        # the cnn extractor's measured near-duplicate threshold (its model version's)
        threshold, _ = default_match_threshold(cat)
        keys = sorted(k for batch in cat.iter_records() for k in (r.key for r in batch))
        half = args.watch // 2
        cat.watch_add_stored("demo", keys[:half], threshold)
        rng = np.random.default_rng(1)
        cat.watch_add(
            "synthetic",
            synthetic(rng, args.watch - half, d),
            [f"s{i}" for i in range(args.watch - half)],
            threshold,
        )
        watched = {iid for _, iid in keys[:half]}
        result: dict[str, float | int | str] = {"catalog_vectors": args.vectors + len(keys)}
        with LocalNatsServer(tmp / "nats") as server:
            cmd = [LOOKALIKE, "stream", "--catalog", str(cat_path), "--nats", server.url]
            cmd += ["--match-threshold", str(threshold), "--format", "json"]
            err = (tmp / "consumer.err").open("w")  # closed after the consumer exits
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
            listener = Listener()
            counter = [0]

            async def post(js: Any, data: bytes, lid: str, iid: str) -> str:
                headers = make_headers("image", lid, iid)
                await js.publish("images.in", data, headers=headers)
                return match_event_id(lid, iid, sha256_hex(data), None)

            async def load() -> None:
                await listener.start(server.url)
                nc = await connect(server.url)
                js = nc.jetstream()
                t0 = time.monotonic()
                loaded = 0
                while True:  # chunks, each followed by one image the consumer must match
                    n = min(CHUNK, args.vectors - loaded)
                    if n > 0:
                        ids = [f"syn/{loaded + i}" for i in range(n)]
                        lids = [f"syn-{(loaded + i) // 10}" for i in range(n)]
                        await asyncio.to_thread(cat.add_vectors, lids, ids, synthetic(rng, n, d))
                        loaded += n
                    counter[0] += 1
                    p = photos[counter[0] % len(photos)]
                    eid = await post(js, p.read_bytes(), f"warm-{counter[0]}", f"warm/{p.name}")
                    await listener.wait_for({eid}, 600)
                    if eid not in listener.first:
                        raise SystemExit(f"the consumer did not answer; see {tmp}/consumer.err")
                    if n <= 0:
                        break
                result["load_s"] = round(time.monotonic() - t0, 1)
                await nc.close()

            async def run_all() -> dict[str, object]:
                await load()
                out = await steady(server.url, args, photos, watched, listener)
                await listener.nc.close()
                return out

            try:
                got = asyncio.run(run_all())
            finally:
                proc.send_signal(signal.SIGTERM)
                out, _ = proc.communicate(timeout=120)
                err.close()
            sent, watch_sent, noise = got["sent"], got["watch"], got["noise"]
            first = listener.first
            lat = np.array([first[e] - t for e, t in sent.items() if e in first])
            wlat = np.array([first[e] - t for e, t in watch_sent.items() if e in first])
            stored = asyncio.run(stored_counts(server.url, "LOOKALIKE_MATCHES"))
            wstored = asyncio.run(stored_counts(server.url, "LOOKALIKE_WATCH"))
            result.update(
                rate_per_s=args.rate,
                seconds=args.seconds,
                images_published=int(args.rate * args.seconds),
                match_events_expected=len(sent),
                match_p50_s=round(float(np.percentile(lat, 50)), 3),
                match_p99_s=round(float(np.percentile(lat, 99)), 3),
                match_max_s=round(float(lat.max()), 3),
                match_events_per_s=round(
                    len(lat)
                    / max(max(first[e] for e in sent if e in first) - min(sent.values()), 1e-9),
                    1,
                ),
                watch_events_expected=len(watch_sent),
                watch_p50_s=round(float(np.percentile(wlat, 50)), 3) if len(wlat) else "-",
                watch_p99_s=round(float(np.percentile(wlat, 99)), 3) if len(wlat) else "-",
                lost=sum(e not in first for e in sent) + sum(e not in first for e in watch_sent),
                duplicates_accepted=sum(c - 1 for c in (stored + wstored).values() if c > 1),
                false_events=sum(e in first for e in noise),
            )
            counts = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
            result["consumer_batches"] = counts.get("batches", 0)
            print(json.dumps(result), file=sys.stderr)  # the main figures, before the peer
            if args.peer:
                result.update(peer(server.url, cat_path, args, photos, tmp))
        result.update(watch_cost(cat, d))
        cat.close()
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:>28}: {value}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
