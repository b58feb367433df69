"""Saved search results expire: ``Catalog.prune_results`` / ``delete_results`` on SQLite and
PostgreSQL, ``lookalike results --older-than`` / ``--delete``, ``DELETE /results/{id}`` and the
server's own pruning (``serve --results-ttl``)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import lookalike
from lookalike.errors import NotFoundError, QueryError
from lookalike.server import create_app
from lookalike.server.expiry import interval

SRC = Path(__file__).resolve().parents[1] / "src"
TOKEN = "expiry-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HITS = [("a", "a/1.jpg", 0.9), ("b", "b/1.jpg", 0.8), ("a", "a/2.jpg", 0.7)]


def saved_at(cat, query_ids) -> dict[str, float]:
    """Save three hits under each id, a little apart; when each was saved."""
    out = {}
    for qid in query_ids:
        cat.save_results(qid, HITS)
        out[qid] = time.time()
        time.sleep(0.02)
    return out


def test_prune_deletes_whole_searches_oldest_first(store_location):
    with lookalike.open_catalog(store_location) as cat:
        at = saved_at(cat, ["q1", "q2", "q3"])
        assert cat.prune_results(3600) == 0  # nothing is an hour old
        # as seen just after q2 was saved, q1 and q2 are older than 0 s; one at a time
        assert cat.prune_results(0, now=at["q2"] + 0.01, limit=1) == 1
        assert not cat.has_saved_results("q1") and cat.has_saved_results("q2")
        assert cat.prune_results(0, now=at["q2"] + 0.01) == 1
        assert not cat.has_saved_results("q2")
        kept = cat.saved_results("q3")  # a later search is whole
        assert [h.image_id for h in kept.hits] == ["a/1.jpg", "b/1.jpg", "a/2.jpg"]
        assert cat.prune_results(7 * 86400, now=at["q3"] + 8 * 86400) == 1
        assert cat.all_saved_results() == []


def test_delete_results_deletes_one_search(store_location):
    with lookalike.open_catalog(store_location) as cat:
        saved_at(cat, ["keep", "drop"])
        cat.delete_results("drop")
        assert not cat.has_saved_results("drop")
        assert len(cat.saved_results("keep").hits) == 3
        with pytest.raises(NotFoundError):
            cat.delete_results("drop")
        with pytest.raises(QueryError):
            cat.prune_results(-1)
        with pytest.raises(QueryError):
            cat.prune_results(float("nan"))
        with pytest.raises(QueryError):
            cat.prune_results(60, limit=0)


def test_pruning_reads_an_index_on_created_at(tmp_path):
    """So a round costs the rows it deletes, not a scan of every saved hit."""
    with lookalike.open_catalog(tmp_path / "cat") as cat:
        saved_at(cat, ["q1"])
        cat.prune_results(60)
    db = sqlite3.connect(tmp_path / "cat" / "catalog.db")
    try:
        plan = db.execute(
            "EXPLAIN QUERY PLAN SELECT query_id FROM query_results "
            "INDEXED BY query_results_created_at WHERE created_at < 1 GROUP BY query_id"
        ).fetchall()
    finally:
        db.close()
    assert any("query_results_created_at" in str(row) for row in plan), plan


def test_pruning_on_postgres_reads_an_index_on_created_at(pg_server, monkeypatch, tmp_path):
    import psycopg

    monkeypatch.setenv("LOOKALIKE_STATE_DIR", str(tmp_path / "state"))
    url = pg_server.create_database("expiry_index")
    with lookalike.open_catalog(url) as cat:
        saved_at(cat, ["q1"])
        cat.prune_results(60)
        cat.prune_results(60)  # the second round finds the index made
    with psycopg.connect(url) as conn:
        names = [r[0] for r in conn.execute("SELECT indexname FROM pg_indexes").fetchall()]
    assert "query_results_created_at" in names


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "lookalike.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_results_command_prunes_and_deletes(tmp_path, no_orphans):
    where = tmp_path / "cat"
    with lookalike.open_catalog(where) as cat:
        saved_at(cat, ["old", "gone", "new"])
    r = run_cli("results", "gone", "--delete", "-c", str(where))
    assert r.returncode == 0 and "deleted" in r.stdout, r.stderr
    r = run_cli("results", "gone", "-c", str(where))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no saved results" in r.stderr
    with lookalike.open_catalog(where) as cat:
        cat.save_results("newer", HITS)
    db = sqlite3.connect(where / "catalog.db")  # "old" and "new" were saved 8 days ago
    with db:
        db.execute(
            "UPDATE query_results SET created_at = created_at - 8 * 86400 "
            "WHERE query_id IN ('old', 'new')"
        )
    db.close()
    r = run_cli("results", "--older-than", "7d", "-c", str(where), "-f", "json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"pruned": 2, "older_than_s": 7 * 86400.0}
    with lookalike.open_catalog(where) as cat:
        assert {h.query_id for h in cat.all_saved_results()} == {"newer"}
    for bad in (["--older-than", "7x"], ["--older-than", "-1d"], [], ["--delete"]):
        r = run_cli("results", *bad, "-c", str(where))
        assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr, bad


# ------------------------------------------------------------------ HTTP


def saved_search(client: TestClient) -> str:
    r = client.post(
        "/search", json={"image_id": "flower/flower-02.jpg", "k": 3, "save": True}, headers=AUTH
    )
    assert r.status_code == 200, r.text
    return r.json()["query_id"]


def test_delete_results_over_http_needs_the_write_token(cnn_catalog_copy):
    app = create_app(cnn_catalog_copy, token=TOKEN)
    with TestClient(app) as client:
        qid = saved_search(client)
        r = client.delete(f"/results/{qid}")
        assert r.status_code == 401
        assert client.get(f"/results/{qid}").status_code == 200
        r = client.delete(f"/results/{qid}", headers=AUTH)
        assert r.status_code == 200 and r.json() == {"deleted": qid}
        assert client.get(f"/results/{qid}").status_code == 404
        assert client.delete(f"/results/{qid}", headers=AUTH).status_code == 404
    app.state.catalog.close()


def test_the_server_prunes_saved_results_while_it_runs(cnn_catalog_copy):
    app = create_app(cnn_catalog_copy, token=TOKEN, results_ttl=1.0)
    assert interval(1.0) == 1.0
    with TestClient(app) as client:
        qid = saved_search(client)
        assert client.get(f"/results/{qid}").status_code == 200
        deadline = time.monotonic() + 10
        while client.get(f"/results/{qid}").status_code == 200:
            assert time.monotonic() < deadline, "the saved result outlived its ttl by 9 s"
            time.sleep(0.2)
        metrics = client.get("/metrics").text
    app.state.catalog.close()
    assert "lookalike_saved_results_pruned_total 1.0" in metrics


def test_a_zero_ttl_keeps_results_and_a_negative_one_is_refused(cnn_catalog_copy):
    app = create_app(cnn_catalog_copy, token=TOKEN, results_ttl=0)
    with TestClient(app) as client:
        qid = saved_search(client)
        time.sleep(1.5)
        assert client.get(f"/results/{qid}").status_code == 200
    app.state.catalog.close()
    with pytest.raises(ValueError):
        create_app(app.state.catalog, results_ttl=-1)
    assert interval(7 * 86400) == 600 and interval(0.5) == 1.0
