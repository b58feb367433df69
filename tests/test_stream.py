"""Real-time ingest through a real NATS JetStream server (started by the tests on a free
loopback port with its own store folder): nothing lost, nothing duplicated, bad messages
dead-lettered, updates and deletes applied."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lookalike
from lookalike.demo import write_demo
from lookalike.stream.jetstream import (
    StreamIngest,
    connect,
    ensure_stream,
    publish,
    publish_event,
    publish_images,
)
from lookalike.stream.localserver import LocalNatsServer
from lookalike.stream.messages import make_headers

NATS = shutil.which("nats-server")
pytestmark = pytest.mark.skipif(
    NATS is None and not os.environ.get("CI"),
    reason="nats-server not installed (apt-get install nats-server; CI installs it)",
)
LOOKALIKE = str(Path(sys.executable).with_name("lookalike"))


@pytest.fixture
def nats_server(tmp_path):
    server = LocalNatsServer(tmp_path / "nats").start()
    yield server
    server.stop()


def count_rows(catalog: Path) -> tuple[int, int]:
    """(rows, distinct keys) in a catalog, read directly from SQLite."""
    with sqlite3.connect(catalog / "catalog.db", timeout=10) as conn:
        rows = conn.execute("SELECT COUNT(*) FROM features").fetchone()[0]
        keys = conn.execute(
            "SELECT COUNT(*) FROM (SELECT DISTINCT listing_id, image_id FROM features)"
        ).fetchone()[0]
    return rows, keys


def consume(catalog: Path, url: str, idle_exit: float = 3.0, **kwargs) -> StreamIngest:
    with lookalike.open_catalog(catalog, extractor="cnn") as cat:
        ingest = StreamIngest(cat, url=url, **kwargs)
        asyncio.run(ingest.run(idle_exit=idle_exit))
    return ingest


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory) -> Path:
    """504 real demo images (14 listings x 36 variants)."""
    root = tmp_path_factory.mktemp("many")
    write_demo(root, images_per_listing=36, queries_per_listing=1, seed=3)
    return root


def test_500_published_images_are_all_searchable(nats_server, many_photos, tmp_path):
    n = publish_images(nats_server.url, "images.in", [many_photos / "photos"])
    assert n == 504
    ingest = consume(tmp_path / "cat", nats_server.url, batch_size=32, max_in_flight=64)
    assert ingest.counts.added == 504 and ingest.counts.dead == 0
    assert count_rows(tmp_path / "cat") == (504, 504)
    with lookalike.open_catalog(tmp_path / "cat") as cat:
        res = cat.search(many_photos / "queries" / "coins" / "q-01.jpg", k=1, group_by="listing")
        assert res.hits[0].listing_id == "coins"


def test_a_killed_consumer_loses_and_duplicates_nothing(nats_server, demo_dir, tmp_path):
    publish_images(nats_server.url, "images.in", [demo_dir / "photos"])
    cat = tmp_path / "cat"
    cmd = [
        LOOKALIKE,
        "stream",
        "--catalog",
        str(cat),
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
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (cat / "catalog.db").exists():
            try:
                if count_rows(cat)[0] >= 8:
                    break
            except sqlite3.OperationalError:
                pass
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # mid-stream, possibly mid-batch
    proc.wait()
    before = count_rows(cat)[0]
    assert 0 < before < 84, f"the kill came too late or too early ({before} of 84)"
    done = subprocess.run([*cmd, "--format", "json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert count_rows(cat) == (84, 84)


def test_a_broker_restart_loses_nothing(nats_server, demo_dir, tmp_path):
    photos = sorted((demo_dir / "photos").rglob("*.jpg"))
    publish_images(nats_server.url, "images.in", photos[:40])
    cat = tmp_path / "cat"
    stop = asyncio.Event()

    async def scenario() -> StreamIngest:
        with lookalike.open_catalog(cat, extractor="cnn") as c:
            ingest = StreamIngest(c, url=nats_server.url, batch_size=8, max_in_flight=8, ack_wait=2)
            task = asyncio.create_task(ingest.run(stop))
            while ingest.counts.added < 8:
                await asyncio.sleep(0.05)
            await asyncio.to_thread(nats_server.stop)  # the broker goes away mid-stream
            await asyncio.sleep(1.0)
            await asyncio.to_thread(nats_server.start)  # and comes back with its store
            await asyncio.to_thread(publish_images, nats_server.url, "images.in", photos[40:])
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and count_rows(cat)[0] < 84:
                await asyncio.sleep(0.2)
            stop.set()
            await task
            return ingest

    asyncio.run(scenario())
    assert count_rows(cat) == (84, 84)


def test_poison_messages_go_to_the_dead_letter_subject(nats_server, demo_dir, tmp_path):
    good = (demo_dir / "photos" / "moon" / "moon-01.jpg").read_bytes()
    msgs = [
        (good, make_headers("image", "moon", "moon/ok.jpg")),
        (b"not an image at all", make_headers("image", "moon", "moon/text.jpg")),
        (good, {"Lookalike-Kind": "image", "Image-Id": "x.jpg"}),  # no Listing-Id
        (b"", make_headers("image", "moon", "moon/empty.jpg")),
        (good * 40, make_headers("image", "moon", "moon/huge.jpg")),  # over max_payload below
        (b"", {"Lookalike-Kind": "teleport", "Listing-Id": "moon"}),
    ]
    asyncio.run(publish(nats_server.url, "images.in", msgs))
    ingest = consume(tmp_path / "cat", nats_server.url, max_payload=len(good) * 10)
    assert ingest.counts.added == 1 and ingest.counts.dead == 5
    assert count_rows(tmp_path / "cat") == (1, 1)

    async def read_dead() -> dict[str, str]:
        nc = await connect(nats_server.url)
        js = nc.jetstream()
        await ensure_stream(js, "LOOKALIKE_DEAD", ["lookalike.dead"])
        sub = await js.pull_subscribe("lookalike.dead", durable="check", stream="LOOKALIKE_DEAD")
        got = await sub.fetch(10, timeout=5)
        await nc.close()
        return {m.headers.get("Image-Id", "?"): m.headers["Dead-Reason"] for m in got}

    dead = asyncio.run(read_dead())
    assert "not an image" in dead["moon/text.jpg"]
    assert "missing header Listing-Id" in dead["x.jpg"]
    assert "empty image payload" in dead["moon/empty.jpg"]
    assert "over the" in dead["moon/huge.jpg"]
    assert "unknown Lookalike-Kind 'teleport'" in dead["?"]


def test_updates_and_deletes_through_the_stream(nats_server, demo_dir, tmp_path):
    publish_images(
        nats_server.url,
        "images.in",
        [demo_dir / "photos" / "chelsea", demo_dir / "photos" / "flower"],
        attrs={"stock_level": 2},
    )
    consume(tmp_path / "cat", nats_server.url)
    q = demo_dir / "queries" / "chelsea" / "q-01.jpg"
    with lookalike.open_catalog(tmp_path / "cat") as cat:
        res = cat.search(q, k=1, group_by="listing", where="stock_level > 0")
        assert res.hits[0].listing_id == "chelsea"
    publish_event(nats_server.url, "images.in", "listing", "chelsea", attrs={"stock_level": 0})
    publish_event(nats_server.url, "images.in", "delete", "flower", "flower/flower-01.jpg")
    ingest = consume(tmp_path / "cat", nats_server.url)
    assert ingest.counts.listings == 1 and ingest.counts.deleted == 1
    with lookalike.open_catalog(tmp_path / "cat") as cat:
        res = cat.search(q, k=5, group_by="listing", where="stock_level > 0")
        assert "chelsea" not in res.listing_ids
        assert cat.stats()["images"] == 11


def test_two_consumers_with_one_durable_name_share_the_load(nats_server, demo_dir, tmp_path):
    publish_images(nats_server.url, "images.in", [demo_dir / "photos"])
    cat_path = tmp_path / "cat"
    with lookalike.open_catalog(cat_path, extractor="cnn") as c:
        c.add_many([])  # claim the model before two writers race for it

    async def both() -> list[StreamIngest]:
        cats = [lookalike.open_catalog(cat_path) for _ in range(2)]
        ingests = [
            StreamIngest(c, url=nats_server.url, batch_size=4, max_in_flight=4) for c in cats
        ]
        await asyncio.gather(*(i.run(idle_exit=3) for i in ingests))
        for c in cats:
            c.close()
        return ingests

    a, b = asyncio.run(both())
    assert a.counts.added > 0 and b.counts.added > 0
    assert a.counts.added + b.counts.added + a.counts.unchanged + b.counts.unchanged >= 84
    assert count_rows(cat_path) == (84, 84)


def test_two_streams_share_one_dead_letter_subject(nats_server, demo_dir, tmp_path):
    """The dead-letter stream of the first consumer is reused by the second (a subject can
    belong to one stream only)."""
    photo = demo_dir / "photos" / "coins" / "coins-01.jpg"
    for name in ("A", "B"):
        publish_images(nats_server.url, f"{name.lower()}.in", [photo], stream=name)
        ingest = consume(
            tmp_path / name,
            nats_server.url,
            idle_exit=1.5,
            stream=name,
            subject=f"{name.lower()}.>",
            durable=name,
        )
        assert ingest.counts.added == 1


def test_the_stream_stores_predictions_once_a_classifier_is_attached(
    nats_server, demo_dir, cnn_catalog_copy
):
    """Recognition in the write path: a catalog with a trained classifier labels every image
    that arrives through the broker (the held-out query photos, which it has never seen)."""
    from lookalike.recognize import labels_from, train

    with lookalike.open_catalog(cnn_catalog_copy) as cat:
        train(cat, labels_from(cat, "listing"))
    assert publish_images(nats_server.url, "images.in", [demo_dir / "queries"]) == 28
    ingest = consume(cnn_catalog_copy, nats_server.url)
    assert ingest.counts.added == 28
    with lookalike.open_catalog(cnn_catalog_copy) as cat:
        records = [r for b in cat.iter_records() for r in b if "/q-" in r.image_id]
    assert len(records) == 28
    right = [r.labels["predicted"] == r.listing_id for r in records]
    assert all(0 < r.labels["probability"] <= 1 for r in records)
    assert sum(right) >= 25  # chance is 2 of 28
