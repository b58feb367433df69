"""Watchlists (standing queries): the store's tables on every backend, the reverse search on
every write path in the image's own transaction, changes taking effect without a restart, the
outbox relayed to NATS (by the consumer and by ``lookalike watch relay``), and the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import lookalike
from lookalike.catalog import match_event_id
from lookalike.errors import NotFoundError, QueryError
from lookalike.images import sha256_hex
from lookalike.store import open_store
from lookalike.types import FeatureBatch, MatchRecord, ModelInfo, WatchEntry

LOOKALIKE = str(Path(sys.executable).with_name("lookalike"))
NATS = shutil.which("nats-server")
needs_nats = pytest.mark.skipif(
    NATS is None and not os.environ.get("CI"), reason="nats-server not installed"
)
THRESHOLD = 0.903  # the cnn extractor's measured near-duplicate threshold


def unit(rng, n, d=8):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def record(event, entry, score=0.9, watchlist="wl"):
    return MatchRecord(event, "l", "i", "sha", watchlist, entry, None, None, score, 1.0)


# ------------------------------------------------------------------ store, every backend


@pytest.fixture
def store(store_location):
    s = open_store(store_location)
    s.claim_model(ModelInfo("test", "1", 8))
    yield s
    s.close()


def test_store_keeps_watchlists_and_bumps_the_watch_sequence(store):
    rng = np.random.default_rng(0)
    v = unit(rng, 3)
    seq0 = store.watch_seq()
    store.add_watch_entries(
        [WatchEntry("a", f"e{i}", v[i], 0.5, source=f"s{i}") for i in range(2)]
        + [WatchEntry("b", "x", v[2], 0.7, ref_listing_id="l", ref_image_id="i")]
    )
    assert store.watch_seq() > seq0
    got = store.watch_entries()
    assert [(e.name, e.entry_id) for e in got] == [("a", "e0"), ("a", "e1"), ("b", "x")]
    np.testing.assert_array_equal(got[0].vector, v[0])
    assert got[2].ref_listing_id == "l" and got[1].source == "s1" and got[0].created_at > 0
    store.add_watch_entries([WatchEntry("a", "e0", v[2], 0.6)])  # replaces
    assert [e.threshold for e in store.watch_entries("a")] == [0.6, 0.5]
    seq1 = store.watch_seq()
    assert store.remove_watch("a", "e1") == 1 and store.watch_seq() > seq1
    assert store.remove_watch("a") == 1 and store.remove_watch("a") == 0
    assert [e.name for e in store.watch_entries()] == ["b"]


def test_store_records_matches_with_the_rows_once_and_keeps_an_outbox(store):
    rng = np.random.default_rng(1)
    b = FeatureBatch(["l"], ["i"], unit(rng, 1), ["sha"])
    store.upsert(b, matches=[record("ev1", "e0"), record("ev1", "e1", 0.95)])
    store.upsert(b, matches=[record("ev1", "e0")])  # a replay records nothing new
    assert store.record_matches([record("ev1", "e1"), record("ev2", "e0", watchlist="z")]) == 1
    rows = store.matches()
    assert [(r.event_id, r.entry_id) for r in rows] == [
        ("ev1", "e0"),
        ("ev1", "e1"),
        ("ev2", "e0"),
    ]
    assert rows[0].seq == rows[1].seq < rows[2].seq  # the first two: the image's write
    assert [r.entry_id for r in store.matches("wl")] == ["e0", "e1"]
    assert [r.event_id for r in store.matches(after_seq=rows[0].seq)] == ["ev2"]
    # a reader that stopped inside a write resumes at the next row of it
    after_first = store.matches(after_seq=rows[0].seq, after_id=rows[0].id)
    assert [(r.event_id, r.entry_id) for r in after_first] == [("ev1", "e1"), ("ev2", "e0")]
    assert store.matches(after_seq=rows[2].seq, after_id=rows[2].id) == []
    assert [r.entry_id for r in store.matches(limit=1, newest=True)] == ["e0"]
    assert len(store.matches(unpublished=True)) == 3
    store.mark_published([rows[0].id, rows[2].id])
    left = store.matches(unpublished=True)
    assert [r.entry_id for r in left] == ["e1"] and left[0].published_at is None
    assert store.matches()[0].published_at is not None


def test_a_failed_write_records_neither_the_image_nor_its_matches(tmp_path):
    """The matches are written in the image's transaction: a failure of one undoes both."""
    cat = lookalike.open_catalog(tmp_path / "cat", extractor="colorhist")
    rng = np.random.default_rng(2)
    ref = unit(rng, 1, 512)
    cat.watch_add("wl", ref, ["r"], 0.9)
    conn = sqlite3.connect(tmp_path / "cat" / "catalog.db")
    conn.execute(
        "CREATE TRIGGER boom BEFORE INSERT ON matches BEGIN SELECT RAISE(ABORT, 'boom'); END"
    )
    conn.commit()
    with pytest.raises(sqlite3.IntegrityError, match="boom"):
        cat.add_vectors(["l"], ["i"], ref)
    assert cat.count() == 0
    conn.execute("DROP TRIGGER boom")
    conn.commit()
    conn.close()
    cat.add_vectors(["l"], ["i"], ref)
    assert cat.count() == 1 and len(cat.matches_since(0)) == 1
    cat.close()


# ------------------------------------------------------------------ the catalog


def test_reverse_search_on_vector_writes_on_every_backend(store_location):
    with lookalike.open_catalog(store_location, extractor="colorhist") as cat:
        rng = np.random.default_rng(3)
        refs = unit(rng, 3, 512)
        cat.watch_add("wl", refs[:2], ["a", "b"], 0.95)
        cat.watch_add("other", refs[2:], ["c"], 0.5)
        near = refs[0] + 0.01 * unit(rng, 1, 512)[0]
        far = unit(rng, 1, 512)[0]
        cat.add_vectors(["l1", "l2"], ["near", "far"], np.stack([near, far]))
        rows = cat.matches_since(0)
        assert [(r.image_id, r.watchlist, r.entry_id) for r in rows] == [("near", "wl", "a")]
        expected = refs[0] @ (near / np.linalg.norm(near))
        assert rows[0].score == pytest.approx(float(expected), abs=1e-6)
        sha = cat.get_image("near").sha256
        assert rows[0].event_id == match_event_id("l1", "near", sha, "wl")
        # rewriting the same vector records nothing new; a removed entry no longer matches
        cat.add_vectors(["l1"], ["near"], near[None, :])
        assert len(cat.matches_since(0)) == 1
        cat.watch_remove("wl", "a")
        cat.add_vectors(["l3"], ["near2"], near[None, :])
        assert len(cat.matches_since(0)) == 1
        assert [r.image_id for r in cat.watch_hits("wl")] == ["near"]


def test_watchlist_arguments_are_checked(tmp_path):
    with lookalike.open_catalog(tmp_path / "cat", extractor="colorhist") as cat:
        v = unit(np.random.default_rng(4), 1, 512)
        for bad in ("", "a.b", "a b", "x" * 65, "watch>"):
            with pytest.raises(QueryError, match="watchlist name"):
                cat.watch_add(bad, v, ["e"], 0.9)
        with pytest.raises(QueryError, match="cosine"):
            cat.watch_add("ok", v, ["e"], 1.5)
        with pytest.raises(QueryError, match="not zero"):
            cat.watch_add("ok", np.zeros((1, 512)), ["e"], 0.9)
        with pytest.raises(QueryError, match="control"):
            cat.watch_add("ok", v, ["e\n"], 0.9)
        with pytest.raises(lookalike.errors.ModelMismatchError):
            cat.watch_add("ok", np.ones((1, 3)), ["e"], 0.9)
        with pytest.raises(NotFoundError):
            cat.watch_remove("nothing")
        with pytest.raises(NotFoundError):
            cat.watch_entries("nothing")


def test_index_and_add_fire_a_watchlist_of_stored_images(demo_dir, cnn_catalog_copy, tmp_path):
    """The real model: a watchlist made of a stored photo catches the same photo written again
    under new keys by ``index`` (a folder) and by ``add`` (bytes), and nothing else."""
    with lookalike.open_catalog(cnn_catalog_copy) as cat:
        cat.watch_add_stored("stolen", [("moon", "moon/moon-02.jpg")], THRESHOLD)
        folder = tmp_path / "in" / "repost"
        folder.mkdir(parents=True)
        shutil.copy(demo_dir / "photos" / "moon" / "moon-02.jpg", folder / "a.jpg")
        shutil.copy(demo_dir / "photos" / "coffee" / "coffee-01.jpg", folder / "b.jpg")
        report = cat.index([tmp_path / "in"])
        assert report.added == 2
        data = (demo_dir / "photos" / "moon" / "moon-02.jpg").read_bytes()
        assert cat.add(data, "other", "other/1.jpg") == "added"
        hits = cat.watch_hits("stolen")
        assert [(h.listing_id, h.image_id) for h in hits] == [
            ("repost", "repost/a.jpg"),
            ("other", "other/1.jpg"),
        ]
        assert all(h.score > 0.999 and h.hit_image_id == "moon/moon-02.jpg" for h in hits)
        assert len(cat.outbox()) == 2


# ------------------------------------------------------------------ NATS


async def read_subject(url: str, subject: str) -> list[tuple[dict, dict]]:
    from lookalike.stream.jetstream import connect

    nc = await connect(url)
    try:
        js = nc.jetstream()
        stream = await js.find_stream_name_by_subject(subject)
        sub = await js.pull_subscribe(subject, stream=stream)
        out = []
        while True:
            try:
                got = await sub.fetch(100, timeout=1)
            except Exception:
                break
            out += [(dict(m.headers or {}), json.loads(m.data)) for m in got]
        return out
    finally:
        await nc.close()


@pytest.fixture
def nats_server(tmp_path):
    from lookalike.stream.localserver import LocalNatsServer

    server = LocalNatsServer(tmp_path / "nats").start()
    yield server
    server.stop()


@needs_nats
@pytest.mark.usefixtures("no_orphans")
def test_an_entry_added_while_the_consumer_runs_fires_on_the_next_image(
    nats_server, demo_dir, cnn_catalog_copy
):
    from lookalike.stream.jetstream import StreamIngest, publish
    from lookalike.stream.messages import make_headers

    photo = demo_dir / "photos" / "hubble" / "hubble-04.jpg"
    data = photo.read_bytes()
    url = nats_server.url

    async def scenario() -> StreamIngest:
        with lookalike.open_catalog(cnn_catalog_copy) as cat:
            ingest = StreamIngest(cat, url=url, batch_size=4)
            task = asyncio.create_task(ingest.run())
            await publish(url, "images.in", [(data, make_headers("image", "p", "p/1.jpg"))])
            while ingest.counts.added < 1:
                await asyncio.sleep(0.05)
            # another process adds a watchlist entry (its own catalog handle)
            with lookalike.open_catalog(cnn_catalog_copy) as other:
                other.watch_add_stored("space", [("hubble", "hubble/hubble-04.jpg")], THRESHOLD)
            await publish(url, "images.in", [(data, make_headers("image", "p", "p/2.jpg"))])
            deadline = time.monotonic() + 60
            while ingest.counts.watch_events < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            # and removes it: the next copy no longer fires
            with lookalike.open_catalog(cnn_catalog_copy) as other:
                other.watch_remove("space")
            await publish(url, "images.in", [(data, make_headers("image", "p", "p/3.jpg"))])
            while ingest.counts.added < 3:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return ingest

    ingest = asyncio.run(scenario())
    assert ingest.counts.added == 3 and ingest.counts.watch_events == 1
    events = asyncio.run(read_subject(url, "lookalike.watch.space"))
    assert len(events) == 1
    headers, body = events[0]
    assert body["watchlist"] == "space" and body["image_id"] == "p/2.jpg"
    assert body["matches"][0]["entry_id"] == "hubble/hubble-04.jpg"
    assert body["matches"][0]["image_id"] == "hubble/hubble-04.jpg"
    assert headers["Nats-Msg-Id"] == match_event_id("p", "p/2.jpg", sha256_hex(data), "space")
    with lookalike.open_catalog(cnn_catalog_copy) as cat:
        assert cat.outbox() == []


@needs_nats
@pytest.mark.usefixtures("no_orphans")
def test_an_http_upload_fires_the_watchlist_through_the_outbox_and_the_relay(
    nats_server, demo_dir, cnn_catalog_copy
):
    from fastapi.testclient import TestClient

    from lookalike.server import create_app

    with lookalike.open_catalog(cnn_catalog_copy) as cat:
        cat.watch_add_stored("coins", [("coins", "coins/coins-01.jpg")], THRESHOLD)
    photo = demo_dir / "photos" / "coins" / "coins-01.jpg"
    app = create_app(cnn_catalog_copy)
    with TestClient(app) as client:
        res = client.post(
            "/images",
            data={"listing_id": "u", "image_id": "u/1.jpg"},
            files={"image": ("c.jpg", photo.read_bytes(), "image/jpeg")},
        )
        assert res.status_code == 200, res.text
    app.state.catalog.close()
    with lookalike.open_catalog(cnn_catalog_copy) as cat:
        (row,) = cat.outbox()
        assert (row.watchlist, row.image_id) == ("coins", "u/1.jpg")
    cmd = [LOOKALIKE, "watch", "relay", "--catalog", str(cnn_catalog_copy)]
    cmd += ["--nats", nats_server.url, "--once"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "published 1 watchlist event(s)" in done.stdout
    events = asyncio.run(read_subject(nats_server.url, "lookalike.watch.coins"))
    assert [b["image_id"] for _, b in events] == ["u/1.jpg"]
    assert events[0][0]["Nats-Msg-Id"] == row.event_id
    with lookalike.open_catalog(cnn_catalog_copy) as cat:
        assert cat.outbox() == []
        assert cat.watch_hits("coins")[0].published_at is not None
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert "published 0 watchlist event(s)" in again.stdout


# ------------------------------------------------------------------ CLI


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LOOKALIKE, *args], capture_output=True, text=True, timeout=300)


def test_watch_commands(demo_dir, cnn_catalog_copy, tmp_path):
    c = ["--catalog", str(cnn_catalog_copy)]
    done = run("watch", "add", "space", str(demo_dir / "photos" / "hubble"), *c, "-f", "json")
    assert done.returncode == 0, done.stderr
    assert "threshold 0.903" in done.stderr
    entries = json.loads(done.stdout)["entries"]
    assert len(entries) == 6 and entries[0]["entry_id"] == "hubble/hubble-01.jpg"
    done = run("watch", "add", "space", *c, "--stored", "moon/moon-01.jpg", "--threshold", "0.9")
    assert done.returncode == 0 and "7 entries" in done.stdout, done.stderr
    listed = run("watch", "list", *c)
    assert "hubble/hubble-01.jpg" in listed.stdout and "0.900" in listed.stdout
    (tmp_path / "in" / "rep").mkdir(parents=True)
    shutil.copy(demo_dir / "photos" / "hubble" / "hubble-03.jpg", tmp_path / "in" / "rep" / "x.jpg")
    done = run("index", str(tmp_path / "in"), str(demo_dir / "queries" / "coffee"), *c)
    assert done.returncode == 0, done.stderr
    hits = run("watch", "hits", "space", *c, "-f", "json")
    assert hits.returncode == 0, hits.stderr
    rows = [json.loads(line) for line in hits.stdout.splitlines()]
    # only the copy fires (not the coffee photos), its own photo first (best score)
    assert {r["image_id"] for r in rows} == {"rep/x.jpg"}
    assert rows[0]["entry_id"] == "hubble/hubble-03.jpg"
    assert rows[0]["published_at"] is None and rows[0]["score"] > 0.999
    table = run("watch", "hits", "space", *c)
    assert "rep/x.jpg" in table.stdout and " no" in table.stdout
    assert run("watch", "remove", "space", "moon/moon-01.jpg", *c).returncode == 0
    assert len(json.loads(run("watch", "list", "space", *c, "-f", "json").stdout)) == 6
    done = run("watch", "remove", "space", *c)
    assert done.returncode == 0 and "removed 6 entries" in done.stdout
    for args in (
        ("watch", "add", "no.dots", str(demo_dir / "photos" / "moon"), *c),
        ("watch", "remove", "space", *c),
        ("watch", "add", "x", *c),
        ("watch", "add", "x", str(tmp_path / "missing.jpg"), *c),
    ):
        done = run(*args)
        assert done.returncode == 1, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr


# ------------------------------------------------------------------ HTTP


@pytest.fixture
def client(cnn_catalog_copy):
    from fastapi.testclient import TestClient

    from lookalike.server import create_app

    app = create_app(cnn_catalog_copy, token="s3cret")
    with TestClient(app) as c:
        c.headers["Authorization"] = "Bearer s3cret"
        yield c
    app.state.catalog.close()


def test_watchlist_endpoints(client, demo_dir):
    moon = (demo_dir / "photos" / "moon" / "moon-05.jpg").read_bytes()
    body = {"name": "moon", "entries": [{"image_id": "moon/moon-05.jpg"}]}
    assert client.post("/watchlists", json=body, headers={"Authorization": ""}).status_code == 401
    res = client.post("/watchlists", json=body)
    assert res.status_code == 200, res.text
    (entry,) = res.json()["entries"]
    assert entry["entry_id"] == "moon/moon-05.jpg" and entry["threshold"] == THRESHOLD
    assert entry["thumbnail_url"].startswith("/thumbnails/moon/moon-05.jpg")
    with lookalike.open_catalog(client.app.state.catalog.uri) as cat:
        v = cat.get_image_vector("coins/coins-02.jpg")
    res = client.post(
        "/watchlists",
        json={
            "name": "mixed",
            "threshold": 0.9,
            "entries": [{"entry_id": "c", "vector": v.tolist()}],
        },
    )
    assert res.status_code == 200 and res.json()["entries"][0]["threshold"] == 0.9
    files = {"image": ("m.jpg", moon, "image/jpeg")}
    res = client.post("/watchlists", data={"name": "mixed", "entry_id": "up"}, files=files)
    assert res.status_code == 200, res.text
    assert [e["entry_id"] for e in res.json()["entries"]] == ["c", "up"]
    listed = client.get("/watchlists").json()["watchlists"]
    assert [(w["name"], len(w["entries"])) for w in listed] == [("mixed", 2), ("moon", 1)]

    # an upload of the same photo fires both watchlists; its hits name it
    res = client.post(
        "/images",
        data={"listing_id": "up", "image_id": "up/1.jpg"},
        files={"image": ("x.jpg", moon, "image/jpeg")},
    )
    assert res.status_code == 200, res.text
    hits = client.get("/matches?watchlist=moon").json()["matches"]
    assert [(h["image_id"], h["entry_id"]) for h in hits] == [("up/1.jpg", "moon/moon-05.jpg")]
    assert hits[0]["hit_thumbnail_url"].startswith("/thumbnails/moon/moon-05.jpg")
    mixed = client.get("/matches?watchlist=mixed").json()
    assert mixed["watchlist"] == "mixed" and [h["entry_id"] for h in mixed["matches"]] == ["up"]
    everything = client.get("/matches?limit=10").json()["matches"]
    assert sorted(h["watchlist"] for h in everything) == ["mixed", "moon"]

    assert client.delete("/watchlists/mixed/entries/up").json() == {"removed": 1}
    assert client.delete("/watchlists/mixed").json() == {"removed": 1}
    assert client.get("/watchlists/mixed").status_code == 404
    kept = client.get("/matches?watchlist=mixed").json()["matches"]  # its hits stay
    assert [h["entry_id"] for h in kept] == ["up"]
    # hostile and wrong input: clear 4xx, never a 500
    for method, path, kwargs, status in [
        ("delete", "/watchlists/mixed", {}, 404),
        ("get", "/watchlists/nothing", {}, 404),
        ("get", "/watchlists/bad.name", {}, 422),
        ("post", "/watchlists", {"json": {"name": "a b", "entries": [{"image_id": "x"}]}}, 422),
        ("post", "/watchlists", {"json": {"name": "n", "entries": []}}, 422),
        ("post", "/watchlists", {"json": {"name": "n", "entries": [{"image_id": "no"}]}}, 404),
        ("post", "/watchlists", {"json": {"name": "n", "entries": [{"vector": [1.0]}]}}, 422),
        (
            "post",
            "/watchlists",
            {"json": {"name": "n", "entries": [{"entry_id": "e", "vector": [1.0, 2.0]}]}},
            409,
        ),
        (
            "post",
            "/watchlists",
            {"json": {"name": "n", "threshold": 2, "entries": [{"image_id": "x"}]}},
            422,
        ),
        (
            "post",
            "/watchlists",
            {
                "data": {"name": "n", "entry_id": "e"},
                "files": {"image": ("a.jpg", b"nope", "image/jpeg")},
            },
            415,
        ),
        ("get", "/matches?watchlist=moon&limit=0", {}, 422),
        ("get", "/matches?watchlist=a.b", {}, 422),
        ("get", "/live?watchlist=a.b", {}, 422),
        # the rules the OpenAPI document declares (tests/test_openapi_contract.py)
        ("post", "/watchlists", {"json": {"name": "n", "entries": [{"image_id": "x"}] * 65}}, 422),
        (
            "post",
            "/watchlists",
            {"json": {"name": "n", "entries": [{"image_id": "x", "vector": [1.0]}]}},
            422,
        ),
        (
            "post",
            "/watchlists",
            {"json": {"name": "n", "entries": [{"entry_id": "e", "vector": [0.0] * 1280}]}},
            422,
        ),
        (
            "post",
            "/watchlists",
            {"json": {"name": "n", "threshold": "0.5", "entries": [{"image_id": "x"}]}},
            422,
        ),
        (
            "post",
            "/watchlists",
            {"json": {"name": "n", "entries": [{"image_id": "x", "extra": 1}]}},
            422,
        ),
        (
            "post",
            "/watchlists",
            {
                "data": {"name": "n", "entry_id": "e", "x": "1"},
                "files": {"image": ("a.jpg", moon, "image/jpeg")},
            },
            422,
        ),
        (
            "post",
            "/watchlists",
            {
                "data": {"name": "n", "entry_id": "e"},
                "files": {"image": ("a.jpg", b"", "image/jpeg")},
            },
            400,
        ),
        (
            "post",
            "/watchlists",
            {"content": b"name=n", "headers": {"Content-Type": "text/plain"}},
            415,
        ),
        ("post", "/watchlists/moon", {}, 405),
    ]:
        res = getattr(client, method)(path, **kwargs)
        assert res.status_code == status, (path, res.status_code, res.text)
        assert "error" in res.json()


def test_live_streams_uploads_and_matches_over_sse(cnn_catalog_copy, demo_dir):
    """A real uvicorn: a client of /live sees an uploaded image and its watchlist match (as
    written), a filtered client only the match, and the backlog on connect."""
    import httpx

    from lookalike.server import create_app

    with lookalike.open_catalog(cnn_catalog_copy) as cat:
        cat.watch_add_stored("camera", [("camera", "camera/camera-02.jpg")], THRESHOLD)
    with serving(create_app(cnn_catalog_copy)) as url:
        seen: dict[str, list[tuple[str, dict]]] = {"all": [], "camera": []}

        ready = {name: threading.Event() for name in seen}

        def listen(name: str, query: str, until: str) -> None:
            headers = {"Accept": "text/event-stream"}
            with httpx.stream("GET", url + "/live" + query, headers=headers, timeout=30) as res:
                assert res.headers["content-type"].startswith("text/event-stream")
                kind = ""
                for line in res.iter_lines():
                    ready[name].set()  # the head: subscribed, every later image comes
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: "):
                        seen[name].append((kind, json.loads(line[6:])))
                        if kind == until:
                            return

        threads = [
            threading.Thread(target=listen, args=("all", "", "match")),
            threading.Thread(target=listen, args=("camera", "?watchlist=camera", "match")),
        ]
        for t in threads:
            t.start()
        for event in ready.values():
            assert event.wait(30), "no head from /live"
        data = (demo_dir / "photos" / "camera" / "camera-02.jpg").read_bytes()
        res = httpx.post(
            url + "/images",
            data={"listing_id": "cam2", "image_id": "cam2/a.jpg"},
            files={"image": ("a.jpg", data, "image/jpeg")},
        )
        assert res.status_code == 200
        for t in threads:
            t.join(30)
        assert [k for k, _ in seen["all"]] == ["image", "match"]
        assert seen["all"][0][1]["image_id"] == "cam2/a.jpg"
        assert seen["all"][1][1]["watchlist"] == "camera"
        assert [k for k, _ in seen["camera"]] == ["match"]
        # a new client gets the recent matches first; without Accept: text/event-stream,
        # only those (a poll that ends)
        seen["all"].clear()
        listen("all", "?backlog=5", "match")
        assert seen["all"][0][1]["image_id"] == "cam2/a.jpg"
        polled = httpx.get(url + "/live?backlog=5", timeout=30)
        assert polled.text.count("event: match") == 1 and "cam2/a.jpg" in polled.text


def test_one_post_adds_its_entries_in_order_in_one_transaction(client):
    """Stored and vector entries of one ``POST /watchlists``: an id given twice keeps the
    later entry; the same image named twice gets its plain id; components near float32's
    limit are normalized, not overflowed; an image that is not stored writes nothing."""
    with lookalike.open_catalog(client.app.state.catalog.uri) as cat:
        coins = cat.get_image_vector("coins/coins-02.jpg")
    big = [3.4e38] * len(coins)
    entries = [
        {"image_id": "moon/moon-03.jpg"},
        {"image_id": "moon/moon-03.jpg", "listing_id": "moon"},
        {"image_id": "coins/coins-01.jpg", "entry_id": "x"},
        {"entry_id": "x", "vector": coins.tolist()},  # replaces the stored coins-01 above
        {"entry_id": "big", "vector": big},
    ]
    res = client.post("/watchlists", json={"name": "mix", "threshold": 0.9, "entries": entries})
    assert res.status_code == 200, res.text
    got = {e["entry_id"]: e for e in res.json()["entries"]}
    assert set(got) == {"moon/moon-03.jpg", "x", "big"}
    assert got["moon/moon-03.jpg"]["ref_image_id"] == "moon/moon-03.jpg"
    assert got["x"]["ref_image_id"] is None and got["x"]["source"] is None
    with lookalike.open_catalog(client.app.state.catalog.uri) as cat:
        vectors = {e.entry_id: e.vector for e in cat.watch_entries("mix")}
    np.testing.assert_allclose(vectors["big"], np.full(len(coins), len(coins) ** -0.5), rtol=1e-6)
    np.testing.assert_allclose(vectors["x"], coins, atol=1e-6)

    res = client.post(
        "/watchlists",
        json={"name": "mix", "entries": [{"entry_id": "y", "vector": big}, {"image_id": "no"}]},
    )
    assert res.status_code == 404
    assert "y" not in {e["entry_id"] for e in client.get("/watchlists/mix").json()["entries"]}


def test_live_needs_the_read_token_before_any_event_and_ends_when_asked(cnn_catalog_copy):
    """A server with a read token answers ``GET /live`` without it (or with a wrong one) with
    a JSON 401 at once, before any event; with it, the stream; ``max_events``,
    ``max_seconds`` and ``Last-Event-ID`` bound and resume it."""
    import httpx

    from lookalike.server import create_app

    with lookalike.open_catalog(cnn_catalog_copy) as cat:  # two recorded matches
        cat.watch_add_stored("moon", [("moon", "moon/moon-03.jpg")], THRESHOLD)
        v = cat.get_image_vector("moon/moon-03.jpg")
        cat.add_vectors(["r1", "r2"], ["r1/a", "r2/b"], np.stack([v, v]))
    with serving(create_app(cnn_catalog_copy, read_token="rt")) as url:
        sse = {"Accept": "text/event-stream"}
        for auth in ({}, {"Authorization": "Bearer nope"}):
            t0 = time.monotonic()
            with httpx.stream("GET", url + "/live", headers={**sse, **auth}, timeout=10) as res:
                assert res.status_code == 401
                assert res.headers["content-type"] == "application/json"
                body = json.loads(res.read())
            assert "bearer token" in body["error"]["message"]
            assert time.monotonic() - t0 < 5  # answered, not streamed until the server ends

        auth = {**sse, "Authorization": "Bearer rt"}
        res = httpx.get(url + "/live?max_events=1", headers=auth, timeout=30)
        assert res.status_code == 200
        assert res.headers["content-type"].startswith("text/event-stream")
        assert res.text.count("event: match") == 1 and "r1/a" in res.text  # ended after one
        first = next(ln[4:] for ln in res.text.splitlines() if ln.startswith("id: "))

        res = httpx.get(
            url + "/live?max_events=5&max_seconds=1", headers={**auth, "Last-Event-ID": first}
        )
        assert res.text.count("event: match") == 1 and "r2/b" in res.text  # only what followed

        t0 = time.monotonic()
        res = httpx.get(url + "/live?backlog=0&max_seconds=0.5", headers=auth, timeout=30)
        elapsed = time.monotonic() - t0
        assert res.status_code == 200 and "event:" not in res.text
        assert 0.4 < elapsed < 10  # nothing to send: it ended after max_seconds
        for query in ("max_seconds=0", "max_seconds=26", "max_events=0", "max_seconds=nan"):
            assert httpx.get(f"{url}/live?{query}", headers=auth).status_code == 422, query
        bad_id = httpx.get(url + "/live", headers={**auth, "Last-Event-ID": "x"})
        assert bad_id.status_code == 422


@contextlib.contextmanager
def serving(app):
    """``app`` on a real uvicorn on a free loopback port; its URL."""
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        app.state.catalog.close()


CHROMIUM = shutil.which("chromium")
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-quic"]


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="chromium not installed")
def test_the_live_tab_in_a_real_browser(cnn_catalog_copy, demo_dir):
    """Debian's chromium (Playwright): the Live tab shows uploads as they arrive with their
    watchlist matches and thumbnails, and its filter keeps one watchlist's matches only."""
    import httpx
    from playwright.sync_api import sync_playwright

    from lookalike.server import create_app

    with lookalike.open_catalog(cnn_catalog_copy) as cat:
        cat.watch_add_stored("camera", [("camera", "camera/camera-01.jpg")], THRESHOLD)
        cat.watch_add_stored("coins", [("coins", "coins/coins-01.jpg")], THRESHOLD)

    def upload(url: str, listing: str, name: str, photo: str) -> None:
        data = (demo_dir / "photos" / photo).read_bytes()
        res = httpx.post(
            url + "/images",
            data={"listing_id": listing, "image_id": f"{listing}/{name}"},
            files={"image": (name, data, "image/jpeg")},
        )
        assert res.status_code == 200, res.text

    with serving(create_app(cnn_catalog_copy)) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
            page.goto(url + "/")
            page.click("#tab-live")
            page.wait_for_selector("#live-status:has-text('connected')")
            assert page.locator("#live-watchlist option").count() == 3
            upload(url, "u1", "a.jpg", "camera/camera-01.jpg")  # fires watchlist camera
            upload(url, "u2", "b.jpg", "chelsea/chelsea-01.jpg")  # fires nothing
            card = page.locator('.arrival[data-image="u1/a.jpg"]')
            card.locator('.match[data-watchlist="camera"]').wait_for()
            page.wait_for_selector('.arrival[data-image="u2/b.jpg"]')
            assert page.locator('.arrival[data-image="u2/b.jpg"] .match').count() == 0
            page.wait_for_function(
                "[...document.querySelectorAll('.arrival img')].every(i => i.complete && "
                "i.naturalWidth > 0)"
            )
            first = page.locator(".arrival").first.get_attribute("data-image")
            assert first == "u2/b.jpg"  # newest first
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "live.png"), full_page=True)

            # filtered to watchlist coins: the recent camera match is not shown, a coins one is
            page.select_option("#live-watchlist", "coins")
            page.wait_for_selector("#live-status:has-text('connected · coins')")
            upload(url, "u3", "c.jpg", "camera/camera-01.jpg")
            upload(url, "u4", "d.jpg", "coins/coins-01.jpg")
            page.locator(
                '.arrival[data-image="u4/d.jpg"] .match[data-watchlist="coins"]'
            ).wait_for()
            assert page.locator('.arrival[data-image="u3/c.jpg"]').count() == 0
            assert page.locator('.match[data-watchlist="camera"]').count() == 0
        finally:
            browser.close()


ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def test_the_relay_sends_each_event_whole_across_outbox_pages(tmp_path):
    """An event whose rows straddle two outbox pages is sent once, with all its matches."""
    from lookalike.stream.recognition import relay_outbox

    class FakeJetStream:
        def __init__(self) -> None:
            self.sent: list[tuple[str, dict, str]] = []

        async def publish(self, subject, payload, headers, timeout):
            self.sent.append((subject, json.loads(payload), headers["Nats-Msg-Id"]))

    with lookalike.open_catalog(tmp_path / "cat", extractor="colorhist") as cat:
        refs = unit(np.random.default_rng(7), 3, 512)
        cat.watch_add("wl", refs, ["a", "b", "c"], -1.0)  # everything matches all three
        cat.add_vectors(["l", "l"], ["i1", "i2"], refs[:2])
        assert len(cat.outbox()) == 6
        js = FakeJetStream()
        assert asyncio.run(relay_outbox(cat, js, limit=4)) == (2, 0)
        assert [(s, len(b["matches"])) for s, b, _ in js.sent] == [
            ("lookalike.watch.wl", 3),
            ("lookalike.watch.wl", 3),
        ]
        assert [b["image_id"] for _, b, _ in js.sent] == ["i1", "i2"]
        assert js.sent[0][1]["matches"][0]["score"] == pytest.approx(1.0, abs=1e-6)
        assert cat.outbox() == []
