"""Model versions and ``lookalike reindex`` on the real demo photos and the real models:
the one-line message of a catalog made by another extractor version (CLI, Python, HTTP), the
second model generation in both stores, the swap and everything that follows it, resume after
``kill -9``, writes and searches from other processes while a reindex runs."""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

import lookalike
from lookalike.demo import write_demo
from lookalike.errors import ModelMismatchError, ModelVersionError
from lookalike.images import decode_image, read_bytes
from lookalike.store import ReindexRow, open_store
from lookalike.types import FeatureBatch, ModelInfo

#: For the tests that start processes (the CLI, a reindex, a searcher): none may outlive them.
no_orphans = pytest.mark.usefixtures("no_orphans")

#: The cnn of the release before this one: the centre crop, average pooling (``...-gap/1``).
PREVIOUS = {"fit": "crop", "pooling": "avg"}
OLD = lookalike.get_extractor("cnn", **PREVIOUS).info.version
CLI = [sys.executable, "-m", "lookalike.cli"]


def current_cnn() -> ModelInfo:
    return lookalike.get_extractor("cnn").info


@pytest.fixture(scope="module")
def previous_vectors(cnn_catalog_dir) -> dict:
    """The demo photos' vectors made by the previous release's cnn (:data:`PREVIOUS`), by key."""
    ext = lookalike.get_extractor("cnn", device="cpu", **PREVIOUS)
    with lookalike.open_catalog(cnn_catalog_dir) as cat:
        records = [r for batch in cat.iter_records() for r in batch]
    images = [decode_image(read_bytes(r.source), name=r.source).image for r in records]
    return dict(zip([r.key for r in records], ext.embed_images(images), strict=True))


def make_old_cnn_catalog(location: str, fresh: Path, previous: dict) -> list:
    """A catalog as the previous release left it: the rows of the fresh cnn catalog ``fresh``
    (same sources and SHA-256) with the previous release's vectors (``previous_vectors``),
    under its model ``cnn@OLD``. Returns the fresh rows."""
    with lookalike.open_catalog(fresh) as cat:
        records = [r for batch in cat.iter_records() for r in batch]
    store = open_store(location)
    try:
        store.claim_model(ModelInfo("cnn", OLD, 1280))
        store.upsert(
            FeatureBatch(
                [r.listing_id for r in records],
                [r.image_id for r in records],
                np.stack([previous[r.key] for r in records]),
                [r.sha256 for r in records],
                sources=[r.source for r in records],
                widths=[r.width for r in records],
                heights=[r.height for r in records],
            )
        )
    finally:
        store.close()
    return records


@pytest.fixture
def fresh_cnn(cnn_catalog_dir, tmp_path) -> Path:
    """A private copy of the cnn demo catalog: a fresh index by today's extractor."""
    return Path(shutil.copytree(cnn_catalog_dir, tmp_path / "fresh"))


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def hits(result) -> list[tuple[str, float]]:
    return [(h.image_id, round(h.score, 4)) for h in result.hits]


# ---------------------------------------------------------------------- the message


def test_an_older_version_says_so_in_one_line_and_stored_vectors_still_answer(
    store_location, fresh_cnn, previous_vectors, demo_dir
):
    make_old_cnn_catalog(store_location, fresh_cnn, previous_vectors)
    query = demo_dir / "queries" / "chelsea" / "q-01.jpg"
    with lookalike.open_catalog(store_location) as cat:
        with pytest.raises(ModelVersionError) as caught:
            cat.search(query, k=3)
        message = str(caught.value)
        assert "\n" not in message
        assert f"cnn@{OLD}" in message and current_cnn().tag in message
        assert f"lookalike reindex --catalog {cat.uri}" in message
        # everything that needs the installed extractor says the same
        for needs_it in (
            lambda: cat.add(query, "new", "new/1.jpg"),
            lambda: cat.index([demo_dir / "queries" / "coins"]),
            lambda: cat.watch_add_images("w", [query], ["e"], 0.9),
        ):
            with pytest.raises(ModelVersionError, match="lookalike reindex --catalog"):
                needs_it()
        # the stored vectors keep answering, by stored id and by vector
        assert cat.search(image_id="chelsea/chelsea-01.jpg", k=2).hits[0].score == pytest.approx(1)
        vector = cat.get_image_vector("coins/coins-03.jpg")
        assert cat.search(vector=vector, k=1).hits[0].image_id == "coins/coins-03.jpg"
        facts = cat.stats()
        assert facts["model"]["version"] == OLD and facts["model_current"] is False
        assert facts["installed_model"] == current_cnn().tag and facts["reindex"] is None
        assert cat.count() == 84


def test_reindex_brings_the_installed_version_and_equals_a_fresh_index(
    store_location, fresh_cnn, previous_vectors, demo_dir
):
    fresh_rows = make_old_cnn_catalog(store_location, fresh_cnn, previous_vectors)
    queries = [demo_dir / "queries" / name / "q-01.jpg" for name in ("chelsea", "moon", "rocket")]
    with lookalike.open_catalog(store_location) as cat:
        before = cat.search(image_id="moon/moon-01.jpg", k=5)  # loads the old vectors
        report = cat.reindex(batch_size=16)
        assert (report.status, report.reindexed, report.resumed) == ("swapped", 84, 0)
        assert report.origins["file"] == 84 and not report.missing
        assert report.source_model == f"cnn@{OLD}" and report.target == current_cnn().tag
        assert cat.model == current_cnn() and cat.stats()["model_current"] is True
        after = cat.search(image_id="moon/moon-01.jpg", k=5)  # the same process follows
        assert hits(after) != hits(before)
        with lookalike.open_catalog(fresh_cnn) as fresh:
            assert hits(after) == hits(fresh.search(image_id="moon/moon-01.jpg", k=5))
            for q in queries:
                got, want = cat.search(q, k=10), fresh.search(q, k=10)
                assert got.hits[0].image_id == want.hits[0].image_id
                assert {h.image_id for h in got.hits} == {h.image_id for h in want.hits}
                np.testing.assert_allclose(got.scores, want.scores, atol=1e-5)
        for rec in fresh_rows:
            np.testing.assert_allclose(
                cat.get_image_vector(rec.image_id, rec.listing_id), rec.vector, atol=1e-5
            )
        assert cat.reindex().status == "current"


def test_the_store_switches_only_when_every_row_is_done(store_location):
    old, new = ModelInfo("m", "1", 4), ModelInfo("m", "2", 3)
    store = open_store(store_location)
    try:
        store.claim_model(old)
        keys = [("a", "a/1"), ("a", "a/2"), ("b", "b/1")]
        store.upsert(
            FeatureBatch(
                [k[0] for k in keys], [k[1] for k in keys], np.eye(4)[:3], ["s1", "s2", "s3"]
            )
        )
        state = store.reindex_begin(new)
        assert (state.total, state.done, state.pending, state.replaces) == (3, 0, 3, old)
        todo = store.reindex_todo(limit=10)
        assert [t.key for t in todo] == keys
        unit = np.full(3, 1 / math.sqrt(3), np.float32)
        store.reindex_write(
            [ReindexRow(t.listing_id, t.image_id, t.seq, unit) for t in todo[:2]]
            + [ReindexRow("b", "b/1", todo[2].seq, None, "b/1: gone")]
        )
        progress = store.reindex_progress()
        assert progress is not None and (progress.done, progress.failed) == (2, 1)
        # a write from bytes meanwhile (old model): its row is due again, its bytes are kept
        store.upsert(
            FeatureBatch(["a"], ["a/2"], np.eye(4)[3:], ["s4"], model=old, blobs=[b"new bytes"])
        )
        out = store.reindex_swap(new)
        assert not out.swapped and out.pending == 1 and store.model() == old
        (item,) = store.reindex_todo(since_seq=state.seq, retry_failed=False)
        assert item.key == ("a", "a/2") and item.data == b"new bytes" and item.sha256 == "s4"
        store.reindex_write([ReindexRow("a", "a/2", item.seq, unit * -1)])
        out = store.reindex_swap(new)  # one image could not be re-extracted: no switch
        assert not out.swapped and out.missing == [(("b", "b/1"), "b/1: gone")]
        assert store.model() == old and store.count() == 3
        out = store.reindex_swap(new, drop_missing=True)
        assert out.swapped and store.model() == new and store.count() == 2
        changes = store.changes_since(0)
        assert changes.model == new and changes.vectors.shape == (2, 3)
        np.testing.assert_allclose(changes.vectors[1], -unit)
        assert store.get(("a", "a/1")).model == new.tag
        assert store.reindex_progress() is None
        with pytest.raises(ModelMismatchError, match="reindexed meanwhile"):  # a late writer
            store.upsert(FeatureBatch(["c"], ["c/1"], np.eye(4)[:1], ["s5"], model=old))
        assert store.count() == 2
    finally:
        store.close()


# ---------------------------------------------------------------------- the faces


@no_orphans
def test_the_cli_names_the_command_and_reindex_fixes_it(
    tmp_path, fresh_cnn, previous_vectors, demo_dir
):
    path = tmp_path / "old"
    make_old_cnn_catalog(str(path), fresh_cnn, previous_vectors)
    query = str(demo_dir / "queries" / "chelsea" / "q-01.jpg")
    r = run_cli("search", query, "-c", str(path), check=False)
    assert r.returncode == 1 and r.stdout == ""
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("error: ") and f"lookalike reindex --catalog {path}" in line
    assert f"cnn@{OLD}" in line and current_cnn().tag in line
    r = run_cli("stream", "-c", str(path), "--nats", "nats://127.0.0.1:9", check=False)
    assert r.returncode == 1 and "lookalike reindex --catalog" in r.stderr  # before connecting
    table = run_cli("stats", "-c", str(path)).stdout
    assert f"model_current: no: re-extract with `lookalike reindex --catalog {path}`" in table
    dry = run_cli("reindex", "-c", str(path), "--dry-run").stdout
    assert "dry run: would re-extract 84 images" in dry and "84 from files" in dry
    assert (
        json.loads(run_cli("stats", "-c", str(path), "-f", "json").stdout)["model_current"] is False
    )
    done = json.loads(run_cli("reindex", "-c", str(path), "--no-progress", "-f", "json").stdout)
    assert (done["status"], done["reindexed"], done["target"]) == ("swapped", 84, current_cnn().tag)
    result = json.loads(run_cli("search", query, "-c", str(path), "-k", "1", "-f", "json").stdout)
    assert result["hits"][0]["listing_id"] == "chelsea"
    help_text = run_cli("reindex", "--help").stdout
    for flag in ("--extractor", "--batch-size", "--dry-run", "--drop-missing", "--thumbnails"):
        assert flag in help_text


def test_http_answers_409_with_the_same_line(tmp_path, fresh_cnn, previous_vectors, demo_dir):
    from lookalike.server import create_app

    path = tmp_path / "old"
    make_old_cnn_catalog(str(path), fresh_cnn, previous_vectors)
    app = create_app(path)
    try:
        with TestClient(app) as client:
            with open(demo_dir / "queries" / "chelsea" / "q-01.jpg", "rb") as fh:
                r = client.post("/search", files={"image": ("q.jpg", fh, "image/jpeg")})
            assert r.status_code == 409, r.text
            message = r.json()["error"]["message"]
            assert f"cnn@{OLD}" in message and current_cnn().tag in message
            assert "lookalike reindex --catalog old" in message and str(tmp_path) not in message
            r = client.post("/search", json={"image_id": "chelsea/chelsea-02.jpg", "k": 2})
            assert (
                r.status_code == 200 and r.json()["hits"][0]["image_id"] == "chelsea/chelsea-02.jpg"
            )
            assert client.get("/stats").json()["model_current"] is False
    finally:
        app.state.catalog.close()


# ---------------------------------------------------------------------- hog -> cnn


@pytest.fixture
def hog_catalog(demo_dir, tmp_path) -> Path:
    """The demo photos (copied, so a test may remove some) indexed with hog."""
    photos = tmp_path / "photos"
    shutil.copytree(demo_dir / "photos", photos)
    path = tmp_path / "hogcat"
    with lookalike.open_catalog(path, extractor="hog") as cat:
        assert cat.index([photos], workers=0).added == 84
    return path


def test_a_migration_brings_everything_that_belongs_to_the_vectors_along(hog_catalog, demo_dir):
    from lookalike.recognize import labels_from, train

    query = demo_dir / "queries" / "rocket" / "q-01.jpg"
    with lookalike.open_catalog(hog_catalog) as cat:
        hog = cat.model
        cat.build_index("ivf", nlist=2)
        cat.save_calibration({"model": hog.tag, "threshold": 0.97})
        train(cat, labels_from(cat, "listing"))
        cat.save_analysis([("coins", "coins/coins-01.jpg")], {"cluster": [3]})
        cat.watch_add_stored("wanted", [("rocket", "rocket/rocket-02.jpg")], 0.9)
        cat.watch_add("vec", np.ones((1, hog.dim)), ["v1"], 0.9)
        hog_hits = hits(cat.search(query, k=3))

        first = cat.reindex("cnn", batch_size=32)  # the vector entry has no stored image
        assert first.status == "incomplete" and first.watch_missing == ["vec/v1"]
        assert cat.model == hog and hits(cat.search(query, k=3)) == hog_hits
        assert cat.stats()["reindex"]["done"] == 84

        report = cat.reindex("cnn", drop_missing=True)
        assert (report.status, report.resumed, report.reindexed) == ("swapped", 84, 0)
        cnn = current_cnn()
        assert cat.model == cnn and cat.search(query, k=1).hits[0].listing_id == "rocket"
        notes = " | ".join(report.after)
        for said in ("calibration", "classifier", "analysis", "ivf index was rebuilt", "engine"):
            assert said in notes, notes
        # watchlists: the stored image's entry follows it, the vector entry is gone
        (entry,) = cat.watch_entries()
        np.testing.assert_array_equal(
            entry.vector, cat.get_image_vector("rocket/rocket-02.jpg", "rocket")
        )
        assert cat.calibration() is None and cat.analysis() == {}
        models = hog_catalog / "models"
        assert not (models / "classifier.joblib").exists() and cat.classifier is None
        assert (models / f"stale-{hog.tag.replace('@', '_').replace('/', '_')}").is_dir()
        ann = json.loads((hog_catalog / "ann" / "ivf.json").read_text())
        assert ann["model"] == cnn.tag and ann["dim"] == 1280
        head = json.loads((hog_catalog / "engine" / "header.json").read_text())
        assert head["model"]["name"] == "cnn" and head["n_alive"] == 84
        assert cat.add(demo_dir / "queries" / "coins" / "q-01.jpg", "new", "new/1.jpg") == "added"
    with lookalike.open_catalog(hog_catalog) as again:  # a new process maps the new files
        assert again.search(query, k=1, index="ivf").hits[0].listing_id == "rocket"
        assert again.stats()["cache_source"] == "files"


@no_orphans
def test_images_whose_source_is_gone_are_listed_and_block_the_switch(hog_catalog, demo_dir):
    photos = hog_catalog.parent / "photos"
    (photos / "moon" / "moon-01.jpg").unlink()
    (photos / "moon" / "moon-02.jpg").unlink()
    shutil.copy(photos / "coins" / "coins-01.jpg", photos / "page" / "page-01.jpg")  # changed
    r = run_cli(
        "reindex", "-c", str(hog_catalog), "--extractor", "cnn", "--no-progress", check=False
    )
    assert r.returncode == 3, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("not reindexed: ")]
    assert len(lines) == 3
    assert sum("no such file" in ln for ln in lines) == 2
    assert sum("changed since it was indexed" in ln for ln in lines) == 1
    assert "3 images and 0 watchlist entries could not be reindexed" in r.stdout
    assert "the catalog still answers from hog@" in r.stdout
    with lookalike.open_catalog(hog_catalog) as cat:
        assert cat.model.name == "hog" and cat.count() == 84
        assert cat.stats()["reindex"] == {
            "target": current_cnn().tag,
            "done": 81,
            "failed": 3,
            "pending": 0,
        }
        for name in ("moon/moon-01.jpg", "moon/moon-02.jpg", "page/page-01.jpg"):
            shutil.copy(demo_dir / "photos" / name, photos / name)
        report = cat.reindex("cnn")  # only the three are redone
        assert (report.status, report.resumed, report.reindexed) == ("swapped", 81, 3)
        assert cat.model == current_cnn() and cat.count() == 84


def test_uploads_are_reindexed_from_their_thumbnails_when_asked(hog_catalog, demo_dir):
    with lookalike.open_catalog(hog_catalog) as cat:
        for i in (1, 2):  # written from bytes, as the HTTP API and the stream write
            data = (demo_dir / "queries" / "rocket" / f"q-0{i}.jpg").read_bytes()
            assert cat.add(data, "uploads", f"u{i}.jpg") == "added"
        report = cat.reindex("cnn")
        assert report.status == "incomplete" and len(report.missing) == 2
        assert all("its bytes are not kept" in why for _, why in report.missing)
        report = cat.reindex("cnn", thumbnails=True)
        assert report.status == "swapped" and report.origins["thumbnail"] == 2
        assert report.reindexed == 2 and report.resumed == 84
        top = cat.search(demo_dir / "queries" / "rocket" / "q-01.jpg", k=2)
        assert {h.listing_id for h in top.hits} <= {"uploads", "rocket"}


# ---------------------------------------------------------------------- other processes


@pytest.fixture(scope="module")
def big_hog_catalog(tmp_path_factory) -> Path:
    """336 demo images (14 listings x 24 variants) indexed with hog: seconds of cnn work to
    reindex. Copy it before changing it (:func:`big_copy`)."""
    root = tmp_path_factory.mktemp("bighog")
    write_demo(root, images_per_listing=24, queries_per_listing=1, seed=5)
    with lookalike.open_catalog(root / "cat", extractor="hog") as cat:
        assert cat.index([root / "photos"]).added == 336
    return root


@pytest.fixture
def big_copy(big_hog_catalog, tmp_path) -> Path:
    shutil.copytree(big_hog_catalog / "cat", tmp_path / "cat")
    return tmp_path / "cat"


def shadow_rows(catalog: Path) -> int:
    """Rows the running reindex has committed (read as another process would)."""
    try:
        with sqlite3.connect(catalog / "catalog.db", timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM features_next").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def start_reindex(catalog: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*CLI, "reindex", "-c", str(catalog), "--extractor", "cnn", "--no-progress", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_rows(catalog: Path, proc: subprocess.Popen, n: int) -> int:
    deadline = time.monotonic() + 300
    while shadow_rows(catalog) < n and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    return shadow_rows(catalog)


@no_orphans
def test_kill_9_mid_run_then_the_rerun_finishes_without_redoing_anything(big_copy):
    proc = start_reindex(big_copy, "--batch-size", "8", "--workers", "1")
    wait_for_rows(big_copy, proc, 16)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    done = shadow_rows(big_copy)
    assert 0 < done < 336, f"the kill came too late or too early ({done} of 336)"
    with lookalike.open_catalog(big_copy) as cat:
        assert cat.model.name == "hog" and cat.count() == 336  # untouched until the swap
        assert cat.stats()["reindex"]["done"] == done
        report = cat.reindex("cnn", batch_size=8)
        assert (report.status, report.resumed, report.reindexed) == ("swapped", done, 336 - done)
        assert cat.model == current_cnn() and cat.count() == 336
    with sqlite3.connect(big_copy / "catalog.db") as conn:
        rows = conn.execute(
            "SELECT COUNT(*), COUNT(DISTINCT listing_id || '/' || image_id), "
            "MIN(LENGTH(vector)), MAX(LENGTH(vector)), COUNT(DISTINCT model) "
            "FROM features"
        ).fetchone()
        assert rows == (336, 336, 1280 * 4, 1280 * 4, 1)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "features_next" not in tables  # it became features
        indexes = {
            r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
        }
        assert {"features_seq", "features_image_id"} <= indexes


@no_orphans
def test_writes_during_a_reindex_end_up_in_the_new_model(big_copy, demo_dir):
    proc = start_reindex(big_copy, "--batch-size", "8", "-f", "json")
    try:
        wait_for_rows(big_copy, proc, 8)
        assert proc.poll() is None, "the reindex ended before the writes"
        with lookalike.open_catalog(big_copy) as cat:  # hog, as a stream consumer would write
            items = [
                (
                    (demo_dir / "queries" / name / "q-01.jpg").read_bytes(),
                    "aaa-new",
                    f"{name}.jpg",
                    None,
                )
                for name in ("chelsea", "coins", "moon")
            ]
            assert [s for s, _ in cat.add_many(items)] == ["added"] * 3
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert report["status"] == "swapped" and report["reindexed"] == 339
    assert report["caught_up"] >= 3 and report["origins"]["bytes"] == 3  # kept, no file
    cnn = lookalike.get_extractor("cnn")
    with lookalike.open_catalog(big_copy) as cat:
        assert cat.model == cnn.info and cat.count() == 339
        for data, lid, iid, _ in items:
            want = cat.embed([data])[0]
            np.testing.assert_allclose(cat.get_image_vector(iid, lid), want, atol=1e-5)


SEARCHER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    import lookalike
    catalog, query, out, stop = sys.argv[1:]
    with lookalike.open_catalog(catalog) as cat, open(out, "w") as fh:
        while not Path(stop).exists():
            for kind in ("id", "image"):
                try:
                    if kind == "id":
                        res = cat.search(image_id="chelsea/chelsea-01.jpg", k=5)
                    else:
                        res = cat.search(query, k=5)
                    row = {"kind": kind, "model": cat.model.tag,
                           "hits": [[h.image_id, h.score] for h in res.hits]}
                except Exception as exc:
                    row = {"kind": kind, "error": f"{type(exc).__name__}: {exc}"}
                fh.write(json.dumps(row) + "\\n")
                fh.flush()
            time.sleep(0.01)
    """
)


def both_searches(cat, query: str) -> dict[str, list]:
    """What the searcher (:data:`SEARCHER`) asks: by stored id and by image."""
    by_id = cat.search(image_id="chelsea/chelsea-01.jpg", k=5)
    by_image = cat.search(query, k=5)
    return {
        "id": [[h.image_id, h.score] for h in by_id.hits],
        "image": [[h.image_id, h.score] for h in by_image.hits],
    }


@no_orphans
def test_a_search_in_another_process_answers_from_one_model_at_a_time(big_copy, tmp_path):
    with lookalike.open_catalog(big_copy) as cat:
        query = cat.get_image("chelsea/chelsea-03.jpg").source  # a demo photo's path
        old = both_searches(cat, query)
    out, stop = tmp_path / "searches.jsonl", tmp_path / "stop"
    searcher = subprocess.Popen(
        [sys.executable, "-c", SEARCHER, str(big_copy), query, str(out), str(stop)]
    )
    try:
        deadline = time.monotonic() + 120
        while (not out.exists() or out.stat().st_size == 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc = start_reindex(big_copy, "--batch-size", "16")
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        n_during = len(out.read_text().splitlines())
        time.sleep(3)  # the searcher goes on after the swap
    finally:
        stop.touch()
        searcher.wait(timeout=120)
    with lookalike.open_catalog(big_copy) as cat:
        new = both_searches(cat, query)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    errors = [r for r in rows if "error" in r]
    assert not errors, errors[:3]

    def same(a, b):
        return [x[0] for x in a] == [x[0] for x in b] and np.allclose(
            [x[1] for x in a], [x[1] for x in b], atol=1e-5
        )

    seen = []
    for r in rows:
        is_old, is_new = same(r["hits"], old[r["kind"]]), same(r["hits"], new[r["kind"]])
        assert is_old or is_new, f"a mix of models: {r}"
        seen.append("new" if is_new and not is_old else "old")
    print(f"searches: {seen.count('old')} answered from hog, then {seen.count('new')} from cnn")
    assert "old" in seen and "new" in seen
    assert seen == sorted(seen, key=lambda s: s == "new"), "went back to the old vectors"
    assert n_during > 4 and seen.count("old") > 2, "no search ran during the reindex"


@no_orphans
@pytest.mark.skipif(not shutil.which("nats-server"), reason="no nats-server")
def test_a_stream_consumer_holds_its_messages_until_the_reindex(
    fresh_cnn, previous_vectors, demo_dir, tmp_path
):
    """A consumer of a catalog of another version cannot embed: its messages are redelivered
    (not dead-lettered, though ``max_deliver`` is 1) until a reindex switches the catalog,
    then written with the installed model by the same consumer."""
    from lookalike.stream.jetstream import StreamIngest, publish
    from lookalike.stream.localserver import LocalNatsServer
    from lookalike.stream.messages import make_headers

    path = tmp_path / "old"
    make_old_cnn_catalog(str(path), fresh_cnn, previous_vectors)
    photos = [demo_dir / "queries" / name / "q-02.jpg" for name in ("coins", "moon", "rocket")]
    messages = [
        (p.read_bytes(), make_headers("image", "new", f"{p.parent.name}.jpg")) for p in photos
    ]
    server = LocalNatsServer(tmp_path / "nats").start()
    outcome: dict[str, int] = {}
    try:
        asyncio.run(publish(server.url, "images.in", messages))

        async def scenario() -> StreamIngest:
            with lookalike.open_catalog(path) as cat:
                ingest = StreamIngest(cat, url=server.url, retry_delay=0.3, max_deliver=1)

                async def reindex_later() -> None:
                    await asyncio.sleep(3)  # the messages are refused meanwhile
                    proc = await asyncio.create_subprocess_exec(
                        *CLI, "reindex", "-c", str(path), "--no-progress"
                    )
                    outcome["reindex"] = await proc.wait()

                task = asyncio.create_task(reindex_later())
                stop = asyncio.Event()
                asyncio.get_running_loop().call_later(240, stop.set)
                await ingest.run(stop, idle_exit=5)
                await task
                return ingest

        ingest = asyncio.run(scenario())
    finally:
        server.stop()
    assert outcome["reindex"] == 0
    assert ingest.counts.added == 3 and ingest.counts.dead == 0
    with lookalike.open_catalog(path) as cat:
        assert cat.model == current_cnn() and cat.count() == 87
        for p in photos:
            np.testing.assert_allclose(
                cat.get_image_vector(f"{p.parent.name}.jpg", "new"),
                cat.embed([p])[0],
                atol=1e-5,
            )
