"""Engine at marketplace scale (issue 18, issue 19 item 2): commands that need no vectors never
load them; searches read an immutable snapshot of the engine and concurrent ones are scanned
together; every answer stays exact."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lookalike
import oracle
from lookalike.types import ModelInfo

MODEL = ModelInfo("external", "1", 8)
LOOKALIKE = str(Path(sys.executable).with_name("lookalike"))


@pytest.fixture
def small_catalog(store_location):
    """60 quantized vectors in 12 listings (stock levels 0, 1, 2, ...), on every store."""
    rng = np.random.default_rng(7)
    keys = [(f"L{i:02d}", f"L{i:02d}/{j}.jpg") for i in range(12) for j in range(5)]
    vectors = oracle.quantized(rng, len(keys), 8)
    with lookalike.open_catalog(store_location) as cat:
        cat.add_vectors(
            [k[0] for k in keys], [k[1] for k in keys], vectors, model=MODEL, normalize=False
        )
        for i in range(12):
            cat.update_listing(f"L{i:02d}", stock_level=i % 3)
        hit = cat.search(vector=vectors[0], k=3, normalize=False, save=True)
    return store_location, keys, vectors, hit


def test_commands_that_need_no_vectors_never_load_them(small_catalog):
    location, _keys, _vectors, saved = small_catalog
    with lookalike.open_catalog(location) as cat:
        facts = cat.stats()
        assert facts["images"] == 60 and facts["listings"] == 12
        assert facts["model"] == {"name": "external", "version": "1", "dim": 8}
        assert facts["engine_loaded"] is False and facts["cache_rows"] is None
        assert facts["engine"] == "fast" and facts["codes"] == "int8"
        assert cat.get_listing("L01").attrs == {"stock_level": 1}
        assert len(cat.listings()) == 12
        assert cat.saved_results(saved.query_id).image_ids == saved.image_ids
        assert cat.count() == 60
        assert cat.resolve_key("L03/2.jpg") == ("L03", "L03/2.jpg")
        assert cat.get_image("L03/2.jpg").vector.shape == (8,)
        assert sum(len(b) for b in cat.iter_records()) == 60
        cat.update_listing("L01", stock_level=5)
        assert cat.delete("L02/0.jpg") == 1
        assert cat.configure(rerank=3)["rerank"] == "3"
        assert cat.stats()["images"] == 59
        assert not cat.engine_loaded  # nothing above read the vector cache
        cat.search(vector=np.ones(8), k=1)
        assert cat.engine_loaded
        facts = cat.stats()
        assert facts["engine_loaded"] is True and facts["cache_source"] == "files"
        assert facts["cache_rows"] == 60  # mapped from the files written by the first search
        assert facts["cache_bytes"] >= 59 * 8 * 4 and facts["codes_bytes"] > 0


def test_cli_stats_and_listing_show_do_not_load_vectors(small_catalog):
    location, *_ = small_catalog
    if "://" in location:
        pytest.skip("the CLI test runs on the folder catalog")
    out = subprocess.run(
        [LOOKALIKE, "stats", "-c", location, "-f", "json"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    facts = json.loads(out.stdout)
    assert facts["images"] == 60 and facts["listings"] == 12 and facts["engine_loaded"] is False
    table = subprocess.run([LOOKALIKE, "stats", "-c", location], capture_output=True, text=True)
    assert "cache_rows: -" in table.stdout and "listings: 12" in table.stdout


# ---------------------------------------------------------------------- snapshots (issue 19)


def test_a_snapshot_never_changes_while_the_cache_moves_on():
    from lookalike.engine import VectorCache
    from lookalike.types import Changes, ListingRecord

    rng = np.random.default_rng(3)
    keys = [(f"L{i}", f"L{i}/{j}") for i in range(10) for j in range(4)]
    vectors = oracle.quantized(rng, len(keys), 8)
    cache = VectorCache(8)
    cache.apply(Changes(1, keys, vectors, []))
    cache.update_listings(2, [ListingRecord(f"L{i}", {"stock_level": i % 2}) for i in range(10)])
    snap = cache.snapshot()
    before = (
        snap.vectors.copy(),
        list(snap.keys),
        snap.alive.copy(),
        dict(snap.row_of),
        snap.listings.where_mask("stock_level > 0").copy(),
        len(snap.listings),
    )
    # deletes, replacements, appends with new listings, attribute changes, then a compaction
    cache.apply(Changes(3, [keys[1], ("new", "new/0")], np.ones((2, 8), np.float32), [keys[0]]))
    cache.update_listings(4, [ListingRecord("L1", {"stock_level": 0, "color": "red"})])
    assert cache.n_rows == 42 and not cache.alive[0] and not cache.alive[1]
    for i in range(2, 20):
        cache.apply(Changes(10 + i, [], np.zeros((0, 8), np.float32), [keys[i]]))
    assert cache.layout >= 1  # compacted: rows renumbered
    after = (
        snap.vectors,
        list(snap.keys),
        snap.alive,
        snap.row_of,
        snap.listings.where_mask("stock_level > 0"),
        len(snap.listings),
    )
    for old, new in zip(before, after, strict=True):
        assert np.array_equal(old, new) if isinstance(old, np.ndarray) else old == new
    assert snap.listings.names() == {"listing_id", "stock_level"}
    assert "color" in cache.listings.names()
    with pytest.raises(ValueError, match="snapshot"):
        snap.apply(Changes(99, [], np.zeros((0, 8), np.float32), [keys[5]]))


@pytest.fixture
def mid_catalog(tmp_path):
    """2,000 quantized vectors (d=16) in 400 listings with stock levels and colours."""
    rng = np.random.default_rng(11)
    keys = [(f"L{i:03d}", f"L{i:03d}/{j}.jpg") for i in range(400) for j in range(5)]
    vectors = oracle.quantized(rng, len(keys), 16)
    cat = lookalike.open_catalog(tmp_path / "cat")
    model = ModelInfo("external", "1", 16)
    cat.add_vectors([k[0] for k in keys], [k[1] for k in keys], vectors, model=model)
    stock = {}
    for i in range(400):
        stock[f"L{i:03d}"] = i % 3
        cat.update_listing(f"L{i:03d}", stock_level=i % 3, color=["red", "blue"][i % 2])
    stored = cat.vector_cache()
    vectors = np.array([stored.vectors[stored.row_of[k]] for k in keys])  # normalized
    yield cat, keys, vectors, stock, rng
    cat.close()


OPTIONS = [
    dict(k=5),
    dict(k=3, where="stock_level > 0"),
    dict(k=4, group_by="listing"),
    dict(k=4, group_by="listing", where="color = 'red' and stock_level >= 1"),
    dict(k=None, threshold=0.5),
    dict(k=6, group_by="listing", agg="sum-top-n", top_n=2),
]


def _oracle(keys, vectors, q, stock, where=None, **options):
    ok = {
        None: lambda lid: True,
        "stock_level > 0": lambda lid: stock[lid] > 0,
        "color = 'red' and stock_level >= 1": lambda lid: int(lid[1:]) % 2 == 0 and stock[lid] >= 1,
    }[where]
    return oracle.search(keys, vectors, q, listing_ok=ok, **options)


def _tuples(result):
    return [(h.listing_id, h.image_id, pytest.approx(h.score, abs=1e-6)) for h in result.hits]


def test_concurrent_searches_are_coalesced_and_every_answer_is_exact(mid_catalog):
    from concurrent.futures import ThreadPoolExecutor

    cat, keys, vectors, stock, rng = mid_catalog
    queries = rng.standard_normal((48, 16)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    jobs = [(q, OPTIONS[i % len(OPTIONS)]) for i, q in enumerate(queries)]
    before = cat.coalescing()
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda job: cat.search(vector=job[0], **job[1]), jobs))
    after = cat.coalescing()
    served = after["requests"] - before["requests"]
    assert served == len(jobs)
    assert after["batches"] - before["batches"] <= served
    for (q, options), result in zip(jobs, got, strict=True):
        want = _oracle(keys, vectors, q, stock, **options)
        assert _tuples(result) == [(a, b, pytest.approx(s, abs=1e-6)) for a, b, s in want]


def test_the_batch_policy_measures_a_single_scan_on_one_query():
    from lookalike.engine.coalesce import BatchPolicy

    policy = BatchPolicy(explore=4)
    assert policy.singles(8) == 0  # batches first
    policy.record(True, 8, 0.08)  # 10 ms a query in a batch
    assert policy.singles(8) == 1  # a single scan not measured yet: on one query only
    policy.record(False, 1, 0.05)  # 50 ms alone: batches are cheaper
    plan = [policy.singles(8) for _ in range(8)]
    assert plan.count(1) == 2 and plan.count(0) == 6  # every 4th decision, one query alone
    policy.record(True, 8, 8.0)  # batches turn dear (widening on crowded scores)
    plan = [policy.singles(8) for _ in range(8)]
    assert plan.count(8) == 6 and plan.count(0) == 2  # one by one; a whole batch now and then


def test_a_batch_split_to_measure_a_single_scan_answers_exactly(mid_catalog, monkeypatch):
    from lookalike.engine.coalesce import BatchPolicy

    cat, keys, vectors, stock, rng = mid_catalog
    monkeypatch.setattr(BatchPolicy, "singles", lambda self, n: 1)  # one alone, then a batch
    queries = rng.standard_normal((6, 16)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    for options in OPTIONS:
        got = cat.search_batch(queries, **options)
        for q, result in zip(queries, got, strict=True):
            want = _oracle(keys, vectors, q, stock, **options)
            assert _tuples(result) == [(a, b, pytest.approx(s, abs=1e-6)) for a, b, s in want]


def test_a_scan_holds_no_catalog_wide_lock_and_reads_one_snapshot(mid_catalog, monkeypatch):
    """While a scan runs, stats, the vector cache and writes go on; the running scan answers
    from the snapshot it started with, the queued one sees the write."""
    import threading

    from lookalike.engine.fast import FastEngine

    cat, keys, vectors, *_ = mid_catalog
    entered, release = threading.Event(), threading.Event()
    real = FastEngine.search

    def slow(self, queries, spec):
        entered.set()
        assert release.wait(30)
        return real(self, queries, spec)

    monkeypatch.setattr(FastEngine, "search", slow)
    probe = vectors[7]
    results = {}
    first = threading.Thread(target=lambda: results.update(a=cat.search(vector=probe, k=2)))
    first.start()
    assert entered.wait(30)  # the first scan is running (and will wait)
    assert cat.stats()["images"] == 2000
    cat.add_vectors(
        ["zz"], ["zz/copy.jpg"], probe[None, :] * 2, model=ModelInfo("external", "1", 16)
    )
    snap = cat.vector_cache()
    assert ("zz", "zz/copy.jpg") in snap.row_of  # the write is applied and published
    second = threading.Thread(target=lambda: results.update(b=cat.search(vector=probe, k=2)))
    second.start()
    release.set()
    first.join(30)
    second.join(30)
    assert results["a"].hits[0].image_id == keys[7][1]  # the scan's own snapshot
    assert "zz/copy.jpg" in results["b"].image_ids  # the next one sees the write
    assert "zz/copy.jpg" not in results["a"].image_ids


def test_the_coalescer_serves_what_queued_during_a_batch_in_one_call():
    import threading
    import time

    from lookalike.engine.coalesce import Coalescer

    entered, gate = threading.Event(), threading.Event()
    sizes: list[list[int]] = []

    def run(batch):
        if not sizes:
            entered.set()
            assert gate.wait(30)  # the first batch blocks until the others queued
        sizes.append(list(batch))
        return [ValueError("odd") if x % 2 else x * 10 for x in batch]

    co = Coalescer(run)
    out: dict[int, object] = {}

    def call(x):
        try:
            out[x] = co.submit(x)
        except ValueError as exc:
            out[x] = exc

    threads = [threading.Thread(target=call, args=(x,)) for x in range(6)]
    threads[0].start()
    assert entered.wait(30)  # the first caller leads, and its batch is running
    for t in threads[1:]:
        t.start()
    deadline = time.monotonic() + 30
    while co.queued < 5 and time.monotonic() < deadline:  # the others queue behind it
        time.sleep(0.01)
    assert co.queued == 5
    gate.set()
    for t in threads:
        t.join(30)
    assert sizes == [[0], [1, 2, 3, 4, 5]] or (sizes[0] == [0] and len(sizes) == 2)
    assert sorted(sizes[1]) == [1, 2, 3, 4, 5]
    assert out[2] == 20 and out[4] == 40 and out[0] == 0
    assert all(isinstance(out[x], ValueError) for x in (1, 3, 5))
    assert (co.batches, co.requests) == (2, 6)


def test_a_failing_batch_fails_its_callers_and_the_next_one_still_runs():
    from lookalike.engine.coalesce import Coalescer

    calls = []

    def run(batch):
        calls.append(batch)
        if len(calls) == 1:
            raise RuntimeError("store went away")
        return [x + 1 for x in batch]

    co = Coalescer(run)
    with pytest.raises(RuntimeError, match="store went away"):
        co.submit(1)
    assert co.submit(2) == 3
