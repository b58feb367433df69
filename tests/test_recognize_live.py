"""Real-time recognition through a real NATS JetStream server: match on arrival (one event per
re-posted known image, none for an unrelated one, at least once and never twice accepted
across a crash, match-only), and the CLI's match flags."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lookalike
from lookalike.catalog import match_event_id
from lookalike.images import sha256_hex
from lookalike.recognize.watch import ArrivalMatching
from lookalike.stream import jetstream
from lookalike.stream.jetstream import StreamIngest, connect, publish
from lookalike.stream.localserver import LocalNatsServer
from lookalike.stream.messages import make_headers
from lookalike.stream.recognition import MatchStep

NATS = shutil.which("nats-server")
pytestmark = [
    pytest.mark.skipif(
        NATS is None and not os.environ.get("CI"),
        reason="nats-server not installed (apt-get install nats-server; CI installs it)",
    ),
    pytest.mark.usefixtures("no_orphans"),
]
LOOKALIKE = str(Path(sys.executable).with_name("lookalike"))
#: The cnn extractor's measured near-duplicate threshold (lookalike.extract).
THRESHOLD = 0.903


@pytest.fixture
def nats_server(tmp_path):
    server = LocalNatsServer(tmp_path / "nats").start()
    yield server
    server.stop()


def noise_jpeg(seed: int) -> bytes:
    """A real JPEG of random noise: like nothing in the demo catalog."""
    pixels = np.random.default_rng(seed).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


async def read_subject(url: str, subject: str, stream: str) -> list[tuple[dict, dict]]:
    """Every message a stream holds on ``subject``: ``(headers, JSON body)``."""
    nc = await connect(url)
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe(subject, stream=stream)
        out = []
        while True:
            try:
                got = await sub.fetch(100, timeout=1)
            except Exception:  # nats TimeoutError: nothing more
                break
            out += [(dict(m.headers or {}), json.loads(m.data)) for m in got]
            for m in got:
                await m.ack()
        return out
    finally:
        await nc.close()


def consume(catalog: Path, url: str, idle_exit: float = 2.5, **kwargs) -> StreamIngest:
    match_only = kwargs.pop("match_only", False)
    with lookalike.open_catalog(catalog) as cat:
        step = MatchStep(cat, ArrivalMatching(THRESHOLD), match_only=match_only)
        ingest = StreamIngest(cat, url=url, match=step, **kwargs)
        asyncio.run(ingest.run(idle_exit=idle_exit))
    return ingest


def test_a_reposted_known_image_gives_one_event_and_an_unrelated_one_none(
    nats_server, demo_dir, cnn_catalog_copy
):
    known = (demo_dir / "photos" / "moon" / "moon-03.jpg").read_bytes()
    msgs = [
        (known, make_headers("image", "fraud-1", "fraud-1/a.jpg", event_time=1000.0)),
        (noise_jpeg(1), make_headers("image", "noise", "noise/x.jpg")),
    ]
    asyncio.run(publish(nats_server.url, "images.in", msgs))
    ingest = consume(cnn_catalog_copy, nats_server.url)
    assert ingest.counts.added == 2 and ingest.counts.matched == 1
    events = asyncio.run(read_subject(nats_server.url, "lookalike.matches", "LOOKALIKE_MATCHES"))
    assert len(events) == 1
    headers, body = events[0]
    assert body["listing_id"] == "fraud-1" and body["image_id"] == "fraud-1/a.jpg"
    assert body["matches"][0]["listing_id"] == "moon"
    assert body["matches"][0]["image_id"] == "moon/moon-03.jpg"
    assert body["matches"][0]["score"] > 0.999
    assert all(m["score"] > THRESHOLD for m in body["matches"])
    assert body["event_time"] == 1000.0 and body["matched_at"] > 1000.0
    assert body["labels"] == {}
    expected = match_event_id("fraud-1", "fraud-1/a.jpg", sha256_hex(known), None)
    assert headers["Nats-Msg-Id"] == body["event_id"] == expected
    # the catalog hits are recorded too (published already: not in the outbox)
    with lookalike.open_catalog(cnn_catalog_copy) as cat:
        rows = cat.matches_since(0)
        assert (rows[0].hit_listing_id, rows[0].watchlist) == ("moon", None)
        assert cat.outbox() == []

    # the same image sent again (no broker de-duplication id): stored already, matched again,
    # and its event, with the same id, dropped by the stream as a duplicate
    asyncio.run(publish(nats_server.url, "images.in", msgs[:1]))
    again = consume(cnn_catalog_copy, nats_server.url)
    assert again.counts.unchanged == 1 and again.counts.match_duplicates == 1
    assert again.counts.matched == 0
    events = asyncio.run(read_subject(nats_server.url, "lookalike.matches", "LOOKALIKE_MATCHES"))
    assert len(events) == 1


def test_own_listing_and_filters(nats_server, demo_dir, cnn_catalog_copy):
    """Another photo of a listing, sent under that listing, matches nothing outside it; with
    the own-listing option it matches its sibling; a where filter drops listings."""
    known = (demo_dir / "photos" / "coffee" / "coffee-02.jpg").read_bytes()
    asyncio.run(
        publish(nats_server.url, "images.in", [(known, make_headers("image", "coffee", "c/x"))])
    )
    assert consume(cnn_catalog_copy, nats_server.url).counts.matched == 0
    with lookalike.open_catalog(cnn_catalog_copy) as cat:
        vector = cat.get_image_vector("coffee/coffee-02.jpg")
        cat.add_vectors(["copy"], ["copy/1"], vector[None, :])
        cat.update_listing("copy", stock_level=0)
        step = MatchStep(cat, ArrivalMatching(THRESHOLD, own_listing=True))
        from lookalike.recognize.watch import Arrival, match_arrivals

        arrivals = [Arrival("coffee", "c/x", "00")]
        events = match_arrivals(cat, arrivals, vector[None, :], step.matching)
        found = {m["image_id"] for m in events[0].body["matches"]}
        assert {"coffee/coffee-02.jpg", "copy/1"} <= found and "c/x" not in found
        filtered = ArrivalMatching(THRESHOLD, own_listing=False, where="stock_level > 0")
        assert match_arrivals(cat, arrivals, vector[None, :], filtered) == []


def test_match_only_stores_nothing(nats_server, demo_dir, cnn_catalog_copy):
    known = (demo_dir / "photos" / "astronaut" / "astronaut-02.jpg").read_bytes()
    msgs = [
        (known, make_headers("image", "x", "x/1.jpg")),
        (b"not an image", make_headers("image", "x", "x/2.jpg")),
        (b"", make_headers("listing", "astronaut", attrs={"stock_level": 99})),
    ]
    asyncio.run(publish(nats_server.url, "images.in", msgs))
    ingest = consume(cnn_catalog_copy, nats_server.url, match_only=True)
    assert ingest.counts.added == 0 and ingest.counts.matched == 1 and ingest.counts.dead == 1
    with lookalike.open_catalog(cnn_catalog_copy) as cat:
        assert cat.count() == 84
        assert cat.get_listing("astronaut").attrs.get("stock_level") != 99
    events = asyncio.run(read_subject(nats_server.url, "lookalike.matches", "LOOKALIKE_MATCHES"))
    assert [b["matches"][0]["image_id"] for _, b in events] == ["astronaut/astronaut-02.jpg"]


def test_events_go_out_again_after_a_crash_and_the_stream_keeps_one_of_each(
    nats_server, demo_dir, cnn_catalog_copy, monkeypatch
):
    """The consumer dies after publishing a batch's events and before acknowledging it: the
    batch is redelivered, the events are published again under the same ids, and the stream
    drops them as duplicates: each event at least once, never twice."""
    photos = sorted((demo_dir / "photos").rglob("*.jpg"))[:12]
    msgs = [
        (p.read_bytes(), make_headers("image", f"re-{p.parent.name}", f"re/{p.name}"))
        for p in photos
    ]
    asyncio.run(publish(nats_server.url, "images.in", msgs))
    real = jetstream.publish_events
    crashes = []

    async def publish_then_crash(js, events):
        out = await real(js, events)
        if not crashes:
            crashes.append(len(events))
            raise ConnectionResetError("the consumer died before the acks")
        return out

    monkeypatch.setattr(jetstream, "publish_events", publish_then_crash)
    ingest = consume(cnn_catalog_copy, nats_server.url, idle_exit=4, ack_wait=1.5, batch_size=6)
    assert crashes and crashes[0] >= 1
    assert ingest.counts.redelivered >= 6
    assert ingest.counts.match_duplicates >= crashes[0]
    events = asyncio.run(read_subject(nats_server.url, "lookalike.matches", "LOOKALIKE_MATCHES"))
    ids = Counter(h["Nats-Msg-Id"] for h, _ in events)
    expected = {
        match_event_id(h["Listing-Id"], h["Image-Id"], sha256_hex(data), None) for data, h in msgs
    }
    assert set(ids) == expected and set(ids.values()) == {1}
    for _, body in events:  # each re-post found its original first
        original = body["image_id"].removeprefix("re/")
        assert body["matches"][0]["image_id"].endswith("/" + original)


def test_kill_9_mid_batch_gives_every_event_at_least_once_never_twice(
    nats_server, demo_dir, cnn_catalog_copy
):
    photos = sorted((demo_dir / "photos").rglob("*.jpg"))
    msgs = [
        (p.read_bytes(), make_headers("image", f"re-{p.parent.name}", f"re/{p.name}"))
        for p in photos
    ]
    asyncio.run(publish(nats_server.url, "images.in", msgs))
    cmd = [
        LOOKALIKE,
        "stream",
        "--catalog",
        str(cnn_catalog_copy),
        "--nats",
        nats_server.url,
        "--batch-size",
        "8",
        "--max-in-flight",
        "8",
        "--ack-wait",
        "2",
        "--idle-exit",
        "6",
        "--match-threshold",
        "auto",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = cnn_catalog_copy / "catalog.db"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with sqlite3.connect(db, timeout=10) as conn:
                if conn.execute("SELECT COUNT(*) FROM matches").fetchone()[0] >= 8:
                    break
        except sqlite3.OperationalError:
            pass
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # mid-stream, possibly between the events and the acks
    proc.wait()
    with sqlite3.connect(db, timeout=10) as conn:
        before = conn.execute("SELECT COUNT(*) FROM features").fetchone()[0] - 84
    assert 0 < before < 84, f"the kill came too late or too early ({before} of 84)"
    done = subprocess.run([*cmd, "--format", "json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "match threshold 0.903" in done.stderr
    events = asyncio.run(read_subject(nats_server.url, "lookalike.matches", "LOOKALIKE_MATCHES"))
    ids = Counter(h["Nats-Msg-Id"] for h, _ in events)
    expected = {
        match_event_id(h["Listing-Id"], h["Image-Id"], sha256_hex(data), None) for data, h in msgs
    }
    assert set(ids) == expected, f"{len(expected - set(ids))} events lost"
    assert set(ids.values()) == {1}, "an event was accepted twice"
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"after kill -9: {counts['matched']} new events, {counts['match_duplicates']} dropped")
