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
from lookalike.extract import ModelInfo
from lookalike.store import FeatureBatch, open_store


def batch(keys, d=4, seed=0, sha="s"):
    rng = np.random.default_rng(seed)
    return FeatureBatch(
        [k[0] for k in keys],
        [k[1] for k in keys],
        rng.standard_normal((len(keys), d)).astype(np.float32),
        [f"{sha}{i}" for i in range(len(keys))],
    )


@pytest.fixture
def store(tmp_path):
    s = open_store(tmp_path / "cat")
    s.claim_model(ModelInfo("test", "1", 4))
    yield s
    s.close()


def test_missing_catalog_without_create_is_not_found(tmp_path):
    with pytest.raises(NotFoundError, match="no catalog"):
        open_store(tmp_path / "nope", create=False)


def test_wal_mode_is_on(store):
    assert store._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


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
