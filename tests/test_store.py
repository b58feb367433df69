"""The SQLite store: upserts, change sequence, tombstones, listings, query results, crash safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from lookalike.errors import NotFoundError
from lookalike.store import open_store
from lookalike.types import FeatureBatch, ModelInfo


def batch(keys, d=4, seed=0, sha="s"):
    rng = np.random.default_rng(seed)
    return FeatureBatch(
        [k[0] for k in keys],
        [k[1] for k in keys],
        rng.standard_normal((len(keys), d)).astype(np.float32),
        [f"{sha}{i}" for i in range(len(keys))],
    )


@pytest.fixture
def store(store_location):
    """The same behavioural tests run on every backend (SQLite, PostgreSQL)."""
    s = open_store(store_location)
    s.claim_model(ModelInfo("test", "1", 4))
    yield s
    s.close()


def test_missing_catalog_without_create_is_not_found(tmp_path):
    with pytest.raises(NotFoundError, match="no catalog"):
        open_store(tmp_path / "nope", create=False)


def test_wal_mode_is_on(tmp_path):
    s = open_store(tmp_path / "cat")
    assert s._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_new_catalog_packs_several_512_d_rows_a_page(tmp_path):
    """16 KiB pages: a 512-d float32 row (about 2.2 KB) took a whole 4 KiB page before."""
    s = open_store(tmp_path / "cat")
    s.claim_model(ModelInfo("test", "1", 512))
    keys = [(f"L{i}", f"{i}.jpg") for i in range(2000)]
    s.upsert(batch(keys, d=512))
    conn = s._conn
    assert conn.execute("PRAGMA page_size").fetchone()[0] == 16384
    s.close()
    size = (tmp_path / "cat" / "catalog.db").stat().st_size
    assert size / len(keys) < 3000  # bytes a row (4 KiB pages: 4,170)


def test_opening_waits_for_a_writer_instead_of_failing(tmp_path):
    """Switching to WAL while another connection holds a write lock makes SQLite answer
    "database is locked" at once (no busy handler); opening a catalog must wait and succeed.
    (Two processes opening a new catalog at once hit this.)"""
    import sqlite3
    import threading

    folder = tmp_path / "cat"
    folder.mkdir()
    sqlite3.connect(folder / "catalog.db").execute("CREATE TABLE other (a)").connection.close()
    locked = threading.Event()

    def writer():
        conn = sqlite3.connect(folder / "catalog.db", isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO other VALUES (1)")
        locked.set()
        time.sleep(0.5)
        conn.execute("COMMIT")
        conn.close()

    thread = threading.Thread(target=writer)
    thread.start()
    locked.wait(5)
    start = time.monotonic()
    s = open_store(folder)
    assert time.monotonic() - start > 0.3  # it waited for the writer's 0.5 s
    assert s._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    s.close()
    thread.join()


def test_model_is_claimed_once(store):
    assert store.claim_model(ModelInfo("other", "2", 8)) == ModelInfo("test", "1", 4)


def test_upsert_is_idempotent_by_key_and_vectors_round_trip(store):
    keys = [("a", "a/1"), ("a", "a/2"), ("b", "b/1")]
    b = batch(keys)
    store.upsert(b)
    store.upsert(b)
    assert store.count() == 3
    assert store.existing([*keys, ("zz", "zz")]) == {k: f"s{i}" for i, k in enumerate(keys)}
    rec = store.get(("a", "a/2"))
    assert rec is not None and rec.vector.tobytes() == b.vectors[1].tobytes()
    assert rec.model == "test@1"


def test_iter_records_pages_every_row_in_key_order(store):
    keys = [(f"L{i % 7}", f"L{i % 7}/{i:03d}") for i in range(23)]
    b = batch(keys)
    store.upsert(b)
    store.delete([keys[5]])
    batches = list(store.iter_records(4))
    assert [len(x) for x in batches] == [4, 4, 4, 4, 4, 2]  # 22 rows, 4 a page
    got = [r for page in batches for r in page]
    want = sorted(k for k in keys if k != keys[5])
    assert [r.key for r in got] == want
    by_key = {k: b.vectors[i] for i, k in enumerate(keys)}
    assert all(r.vector.tobytes() == by_key[r.key].tobytes() for r in got)
    assert next(iter(store.iter_records(100)))[0].model == "test@1"


def test_iter_vectors_pages_keys_and_vectors_in_key_order(store):
    keys = [(f"L{i % 5}", f"L{i % 5}/{i:03d}") for i in range(13)]
    b = batch(keys)
    store.upsert(b)
    store.delete([keys[2]])
    seq = store.seq()
    assert seq == store.changes_since(0).seq
    pages = list(store.iter_vectors(5))
    assert [len(k) for k, _ in pages] == [5, 5, 2]
    got = [k for page, _ in pages for k in page]
    assert got == sorted(k for k in keys if k != keys[2])
    by_key = {k: b.vectors[i] for i, k in enumerate(keys)}
    vectors = np.concatenate([v for _, v in pages])
    assert vectors.dtype == np.float32 and vectors.shape == (12, 4)
    assert all(v.tobytes() == by_key[k].tobytes() for k, v in zip(got, vectors, strict=True))
    store.upsert(batch([("z", "z/1")], seed=2))
    assert store.seq() > seq


def test_changes_since_reports_upserts_then_deletes(store):
    store.upsert(batch([("b", "b/1"), ("a", "a/1")]))
    full = store.changes_since(0)
    assert full.upserted == [("a", "a/1"), ("b", "b/1")]  # clustered by (listing_id, image_id)
    store.upsert(batch([("c", "c/1")], seed=1))
    assert store.delete([("a", "a/1"), ("nope", "x")]) == 1
    delta = store.changes_since(full.seq)
    assert delta.upserted == [("c", "c/1")]
    assert delta.deleted == [("a", "a/1")]
    assert delta.vectors.shape == (1, 4)
    assert store.changes_since(delta.seq).upserted == []


def test_listing_attributes_merge_and_remove(store):
    store.upsert_listing("a", {"stock_level": 3, "color": "red"})
    store.upsert_listing("a", {"stock_level": 0, "etag": "x1"})
    assert store.get_listing("a").attrs == {"stock_level": 0, "etag": "x1", "color": "red"}
    store.upsert_listing("a", {"color": None})
    assert store.get_listing("a").attrs == {"stock_level": 0, "etag": "x1"}
    seq, changed = store.listings_since(0)
    assert [r.listing_id for r in changed] == ["a"] and seq > 0
    assert store.listings_since(seq)[1] == []


def test_many_listings_update_in_one_call_in_order(store):
    store.upsert_listing("a", {"stock_level": 3, "color": "red"})
    seq0, _ = store.listings_since(0)
    store.upsert_listings([("a", {"stock_level": 0}), ("b", {"etag": "e"}), ("a", {"color": None})])
    assert store.get_listing("a").attrs == {"stock_level": 0}  # merged, in order
    assert store.get_listing("b").attrs == {"etag": "e"}
    seq, changed = store.listings_since(seq0)
    assert sorted(r.listing_id for r in changed) == ["a", "b"] and seq == seq0 + 3
    store.upsert_listings([])
    assert store.listings_since(seq)[1] == []


def test_ingest_creates_listing_rows(store):
    store.upsert(batch([("new-listing", "n/1")]))
    assert store.get_listing("new-listing").attrs == {}


def test_query_results_keep_order(store):
    store.save_results("q1", [("a", "a/1", 0.9), ("b", "b/1", 0.5)])
    rows = store.get_results("q1")
    assert [(r.rank, r.listing_id, r.score) for r in rows] == [(1, "a", 0.9), (2, "b", 0.5)]


def test_a_crash_mid_transaction_leaves_no_partial_batch(tmp_path):
    """kill -9 a writer between its inserts and COMMIT: the store has none of the batch."""
    path = tmp_path / "cat"
    s = open_store(path)
    s.claim_model(ModelInfo("test", "1", 4))
    s.upsert(batch([("a", "a/1")]))
    s.close()
    code = textwrap.dedent(f"""
        import sys, time, numpy as np
        from lookalike.store import open_store
        s = open_store({str(path)!r})
        with s._write() as cur:
            for i in range(500):
                cur.execute("INSERT INTO features (listing_id, image_id, vector, model, sha256, "
                            "ingested_at, seq) VALUES (?, ?, ?, 'test@1', 'x', 0, 99)",
                            ("crash", f"crash/{{i}}", np.zeros(4, np.float32).tobytes()))
            print("inserted", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "inserted"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.1)
    s = open_store(path)
    assert s.count() == 1
    assert s.changes_since(0).upserted == [("a", "a/1")]
    assert s._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_settings_analysis_and_hash_listings(store):
    store.set_setting("codes", "float16")
    store.set_setting("rerank", "8")
    store.set_setting("rerank", None)
    assert store.settings() == {"codes": "float16"}
    keys = [("a", "a/1"), ("b", "b/1")]
    store.upsert(batch(keys))
    store.save_analysis(keys, {"cluster": [3, 4], "x": [0.5, -1.0]})
    store.save_analysis(keys[:1], {"outlier_score": [0.9]})
    got = store.analysis()
    assert got[("a", "a/1")]["cluster"] == 3 and got[("a", "a/1")]["outlier_score"] == 0.9
    assert got[("b", "b/1")]["x"] == -1.0 and got[("b", "b/1")]["outlier_score"] is None
    assert store.all_sha256() == {keys[0]: "s0", keys[1]: "s1"}
    assert store.find_image("b/1") == [("b", "b/1")]
    store.delete(keys[:1])
    assert set(store.analysis()) == {("b", "b/1")}  # analysis of deleted images is not returned


def test_a_duplicate_key_in_one_batch_keeps_the_last(store):
    b = batch([("a", "a/1"), ("a", "a/1")], sha="x")
    store.upsert(b)
    assert store.count() == 1 and store.existing([("a", "a/1")]) == {("a", "a/1"): "x1"}


def test_a_killed_postgres_writer_leaves_no_partial_batch(pg_server):
    """kill -9 a writer in the middle of its COPY transaction: none of the batch is stored."""
    url = pg_server.create_database("crash")
    s = open_store(url)
    s.claim_model(ModelInfo("test", "1", 4))
    s.upsert(batch([("a", "a/1")]))
    code = textwrap.dedent(f"""
        import time, numpy as np
        from lookalike.store import open_store
        s = open_store({url!r})
        with s._tx() as cur:
            s._next_seq(cur)
            cur.execute("CREATE TEMP TABLE staging (LIKE features) ON COMMIT DROP")
            with cur.copy("COPY staging (listing_id, image_id, vector, model, sha256, "
                          "ingested_at, seq) FROM STDIN") as copy:
                for i in range(2000):
                    copy.write_row(("crash", f"crash/{{i}}", np.zeros(4, "<f4").tobytes(),
                                    "test@1", "x", 0.0, 99))
            cur.execute("INSERT INTO features SELECT * FROM staging")
            print("inserted", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "inserted"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert s.count() == 1  # the other session's rows were never committed
    assert s.changes_since(0).upserted == [("a", "a/1")]
    s.upsert(batch([("b", "b/1")]))  # and the counter row lock was released
    assert s.count() == 2
    s.close()


WRITER = """
import sys, numpy as np
from lookalike.store import open_store
from lookalike.types import FeatureBatch
from lookalike.types import ModelInfo
s = open_store(sys.argv[1])
s.claim_model(ModelInfo("test", "1", 4))
who = sys.argv[2]
for b in range(20):
    keys = [(f"{who}-{b % 7}", f"{who}/{b}/{i}") for i in range(25)]
    keys += [("shared", f"shared/{b}/{i}") for i in range(5)]  # both writers write these
    s.upsert(FeatureBatch([k[0] for k in keys], [k[1] for k in keys],
                          np.ones((len(keys), 4), np.float32), ["h"] * len(keys)))
s.close()
"""


def test_two_concurrent_writer_processes_end_with_the_exact_union(store_location):
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, store_location, who])
        for who in ("left", "right")
    ]
    for p in procs:
        assert p.wait(timeout=300) == 0
    s = open_store(store_location)
    assert s.count() == 2 * 20 * 25 + 20 * 5  # each writer's own rows, and the shared ones once
    changes = s.changes_since(0)
    assert len(set(changes.upserted)) == len(changes.upserted) == s.count()
    s.close()
