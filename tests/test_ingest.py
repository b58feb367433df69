"""The ingest pipeline on real images: idempotence, bad files, resume after kill -9, URLs, no
orphan worker processes after kill -9 or SIGTERM of `lookalike index`."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import lookalike
from conftest import proc_alive, proc_descendants
from lookalike.demo import write_demo

# every test here may start processes (decode workers, `lookalike index`): none may outlive it
pytestmark = pytest.mark.usefixtures("no_orphans")


def count_rows(catalog: Path) -> int:
    db = catalog / "catalog.db"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM features").fetchone()[0]
    except sqlite3.OperationalError:  # schema not created yet
        return 0


def test_indexing_twice_adds_nothing(cnn_catalog_copy, demo_dir):
    with lookalike.open_catalog(cnn_catalog_copy) as cat:
        report = cat.index([demo_dir / "photos"])
        assert (report.added, report.updated, report.skipped, report.failed) == (0, 0, 84, [])
        assert cat.stats()["images"] == 84


def test_changed_bytes_under_a_stored_key_are_reextracted(cnn_catalog_copy, demo_dir, tmp_path):
    photos = tmp_path / "photos"
    shutil.copytree(demo_dir / "photos", photos)
    target = photos / "moon" / "moon-01.jpg"
    with lookalike.open_catalog(cnn_catalog_copy) as cat:
        old = cat.get_image_vector("moon/moon-01.jpg")
        shutil.copy(demo_dir / "photos" / "coins" / "coins-01.jpg", target)
        report = cat.index([photos])
        assert (report.added, report.updated, report.skipped) == (0, 1, 83)
        new = cat.get_image_vector("moon/moon-01.jpg")
        assert float(old @ new) < 0.9
        top = cat.search(image_id="moon/moon-01.jpg", k=2, group_by="listing")
        assert top.listing_ids == ["coins", "moon"]  # same bytes in both: a tie, by listing_id
        assert top.hits[0].image_id == "coins/coins-01.jpg"


def png_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def photos_with_bad_files(demo_dir, tmp_path) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "photos"
    shutil.copytree(demo_dir / "photos", root)
    bad = root / "broken"
    bad.mkdir()
    good = (demo_dir / "photos" / "rocket" / "rocket-01.jpg").read_bytes()
    files = {
        "truncated.jpg": good[: len(good) // 3],
        "empty.jpg": b"",
        "text.jpg": b"just some text, not an image",
        "garbage.png": b"\x89PNG\r\n\x1a\n" + os.urandom(200),
        "cut.png": png_bytes()[:2000],
    }
    for name, data in files.items():
        (bad / name).write_bytes(data)
    reasons = {
        "truncated.jpg": "corrupt or truncated",
        "empty.jpg": "empty file",
        "text.jpg": "not an image",
        "garbage.png": "not an image",
        "cut.png": "corrupt or truncated",
    }
    return root, reasons


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_files_are_reported_and_the_batch_goes_on(photos_with_bad_files, tmp_path, workers):
    root, reasons = photos_with_bad_files
    with lookalike.open_catalog(tmp_path / f"cat{workers}") as cat:
        report = cat.index([root], workers=workers, batch_size=16)
        assert report.added == 84
        failed = {Path(loc).name: why for loc, why in report.failed}
        assert set(failed) == set(reasons)
        for name, why in reasons.items():
            assert why in failed[name]
            assert str(root / "broken" / name) in failed[name]  # the reason names the file
        assert cat.stats()["images"] == 84


def test_worker_processes_and_inline_decoding_give_identical_vectors(demo_dir, tmp_path):
    vecs = []
    for workers in (0, 2):
        with lookalike.open_catalog(tmp_path / f"c{workers}", extractor="cnn") as cat:
            cat.index([demo_dir / "photos"], workers=workers)
            vecs.append(np.stack([r.vector for b in cat.iter_records() for r in b]))
    assert np.array_equal(vecs[0], vecs[1])


def test_duplicate_keys_in_one_run_are_failures(demo_dir, tmp_path):
    manifest = tmp_path / "m.csv"
    p = demo_dir / "photos" / "chelsea"
    manifest.write_text(
        "listing_id,image_id,path\n"
        f"cat,one,{p / 'chelsea-01.jpg'}\ncat,one,{p / 'chelsea-02.jpg'}\n"
        f"cat,two,{p / 'chelsea-03.jpg'}\n"
    )
    with lookalike.open_catalog(tmp_path / "cat") as cat:
        report = cat.index([manifest])
        assert report.added == 2 and len(report.failed) == 1
        assert "duplicate key ('cat', 'one')" in report.failed[0][1]


def test_urls_are_fetched(demo_dir, tmp_path):
    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(demo_dir / "photos")
    )
    handler.log_message = lambda *a, **k: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        with lookalike.open_catalog(tmp_path / "cat") as cat:
            report = cat.index([f"{base}/flower/flower-01.jpg", f"{base}/flower/missing.jpg"])
            assert report.added == 1
            assert "404" in report.failed[0][1] and "missing.jpg" in report.failed[0][1]
            res = cat.search(demo_dir / "queries" / "flower" / "q-01.jpg", k=1)
            assert res.hits[0].image_id == "flower/flower-01.jpg"
    finally:
        server.shutdown()


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path):
    """kill -9 `lookalike index` mid-run; the rerun adds exactly the rest, no duplicates."""
    photos = tmp_path / "big"
    write_demo(photos, images_per_listing=24, queries_per_listing=0, seed=5)
    total = 14 * 24
    cat = tmp_path / "cat"
    cmd = [
        sys.executable,
        "-m",
        "lookalike.cli",
        "index",
        str(photos / "photos"),
        "--catalog",
        str(cat),
        "--batch-size",
        "8",
        "--workers",
        "1",
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while count_rows(cat) < 16 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = count_rows(cat)
    assert 0 < done < total, f"the kill came too late or too early ({done} of {total})"
    with lookalike.open_catalog(cat) as c:
        report = c.index([photos / "photos"])
        assert report.skipped == done
        assert report.added == total - done
        assert c.stats()["images"] == total
    with sqlite3.connect(cat / "catalog.db") as conn:
        distinct = conn.execute(
            "SELECT COUNT(*) FROM (SELECT DISTINCT listing_id, image_id FROM features)"
        ).fetchone()[0]
    assert distinct == total


@pytest.fixture(scope="module")
def big_photos(tmp_path_factory) -> Path:
    """336 real demo images (14 listings x 24 variants): seconds of work for `index`."""
    root = tmp_path_factory.mktemp("big")
    write_demo(root, images_per_listing=24, queries_per_listing=0, seed=5)
    return root / "photos"


def start_index(photos: Path, cat: Path, logs: Path) -> subprocess.Popen:
    """`lookalike index` with 2 decode workers (the environment, PYTHONPATH included, is
    passed on), waited for until it has committed a batch and its workers run. Its output goes
    to ``logs/out`` and ``logs/err`` (files, not pipes: an orphaned worker would hold a pipe
    open and block the reader)."""
    cmd = [
        sys.executable,
        "-m",
        "lookalike.cli",
        "index",
        str(photos),
        "--catalog",
        str(cat),
        "--batch-size",
        "8",
        "--workers",
        "2",
        "--no-progress",
    ]
    with open(logs / "out", "w") as out, open(logs / "err", "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
    deadline = time.monotonic() + 120
    while count_rows(cat) < 8 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "index ended before it could be interrupted"
    return proc


def wait_gone(pids: set[int], within: float) -> tuple[set[int], float]:
    """Wait until none of ``pids`` is alive; returns those still alive and the seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        alive = {p for p in pids if proc_alive(p)}
        if not alive:
            break
        time.sleep(0.05)
    return {p for p in pids if proc_alive(p)}, time.monotonic() - t0


def test_kill_9_of_index_leaves_no_worker_processes(big_photos, tmp_path):
    """The decode workers die with their parent, even when it cannot clean up."""
    proc = start_index(big_photos, tmp_path / "cat", tmp_path)
    workers = proc_descendants(proc.pid)
    assert len(workers) >= 2, "the decode workers are not running"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    left, waited = wait_gone(workers, within=5)
    assert not left, f"{len(left)} worker(s) outlived kill -9 of their parent"
    print(f"workers after kill -9: {len(left)} of {len(workers)}, gone in {waited:.2f} s")


def test_sigterm_of_index_commits_the_batch_in_hand_and_prints_a_summary(big_photos, tmp_path):
    """SIGTERM behaves like Ctrl-C: the batch in hand is committed, the summary so far is
    printed, the exit code is 143 (128 + SIGTERM), and no worker is left."""
    cat = tmp_path / "cat"
    proc = start_index(big_photos, cat, tmp_path)
    workers = proc_descendants(proc.pid)
    assert len(workers) >= 2
    at_signal = count_rows(cat)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    out, err = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    assert proc.returncode == 143, (out, err)
    assert "interrupted (SIGTERM)" in err and "Traceback" not in err, err
    summary = (out.strip().splitlines() or [""])[-1]
    added = int(summary.split(" added,")[0])
    rows = count_rows(cat)
    assert at_signal <= rows < 14 * 24, f"{rows} rows: the run was not interrupted"
    assert added == rows, f"summary says {added} added, the catalog holds {rows}"
    left, _ = wait_gone(workers, within=5)
    assert not left, f"{len(left)} worker(s) outlived SIGTERM of their parent"
    with lookalike.open_catalog(cat) as c:  # and the rerun resumes: exactly the rest
        report = c.index([big_photos], workers=0)
        assert report.skipped == rows and report.added == 14 * 24 - rows
