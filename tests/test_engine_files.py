"""Memory-mapped cold start (issue 18 item 1): the vector cache is kept in files beside the
catalog, a new process maps them instead of reading the store, and they are never trusted
blindly: stale, corrupt or foreign files are rebuilt from the store, and every answer stays
the store's."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import lookalike
import oracle
from lookalike.catalog import engines as engines_mod
from lookalike.catalog.cachesource import CHECKED_ROWS
from lookalike.types import ModelInfo

MODEL = ModelInfo("external", "1", 16)
OPTIONS = [
    dict(k=5),
    dict(k=4, group_by="listing", agg="mean"),
    dict(k=3, where="stock_level > 0"),
    dict(k=None, threshold=0.2),
]


def write_catalog(path, rng):
    """300 quantized vectors (d=16) in 60 listings, stock 0/1/2, at ``path`` (no search)."""
    keys = [(f"L{i:02d}", f"L{i:02d}/{j}.jpg") for i in range(60) for j in range(5)]
    vectors = oracle.quantized(rng, len(keys), 16)
    with lookalike.open_catalog(path) as cat:
        cat.add_vectors(
            [k[0] for k in keys], [k[1] for k in keys], vectors, model=MODEL, normalize=False
        )
        cat.update_listings({f"L{i:02d}": {"stock_level": i % 3} for i in range(60)})
    return vectors


@pytest.fixture
def catalog(tmp_path):
    """:func:`write_catalog`, its engine files written by a first search."""
    rng = np.random.default_rng(5)
    path = tmp_path / "cat"
    vectors = write_catalog(path, rng)
    with lookalike.open_catalog(path) as cat:
        cat.search(vector=vectors[0], k=1)  # loads from the store and writes the files
        assert cat.stats()["cache_source"] == "store"
    assert (path / "engine" / "header.json").exists()
    return path, rng


def answers(cat, queries):
    """Hits of every query with every option set; quantized vectors, not normalized, so every
    score is exact and every engine must agree bit for bit."""
    return [
        [
            (h.listing_id, h.image_id, h.score)
            for h in cat.search(vector=q, normalize=False, **o).hits
        ]
        for q in queries
        for o in OPTIONS
    ]


def store_answers(path, queries, monkeypatch):
    """The same searches on a cache read from the store (files off)."""
    monkeypatch.setenv("LOOKALIKE_ENGINE_FILES", "0")
    with lookalike.open_catalog(path) as cat:
        out = answers(cat, queries)
        assert cat.stats()["cache_source"] == "store"
    monkeypatch.delenv("LOOKALIKE_ENGINE_FILES")
    return out


def header(path):
    return json.loads((path / "engine" / "header.json").read_text())


def test_a_new_process_maps_the_files_and_answers_as_the_store(catalog, monkeypatch):
    path, rng = catalog
    queries = oracle.quantized(rng, 3, 16)
    with lookalike.open_catalog(path) as cat:
        got = answers(cat, queries)
        facts = cat.stats()
        assert facts["cache_source"] == "files" and facts["cache_rows"] == 300
        assert cat._engines.source.await_verified(30)  # every vector matched its digest
    assert got == store_answers(path, queries, monkeypatch)


def test_writes_since_the_files_are_applied_then_appended(catalog, monkeypatch):
    path, rng = catalog
    before = header(path)
    code = textwrap.dedent(f"""
        import numpy as np, lookalike
        from lookalike.types import ModelInfo
        with lookalike.open_catalog({str(path)!r}) as cat:  # another process, no search
            cat.add_vectors(["new"], ["new/0.jpg"], np.full((1, 16), 0.25),
                            model=ModelInfo("external", "1", 16), normalize=False)
            cat.delete("L03/1.jpg")
            cat.update_listing("L04", stock_level=0)
    """)
    subprocess.run([sys.executable, "-c", code], check=True)
    queries = [np.full(16, 0.25, np.float32), *oracle.quantized(rng, 2, 16)]
    with lookalike.open_catalog(path) as cat:
        got = answers(cat, queries)
        assert cat.stats()["cache_source"] == "files"
        assert "new/0.jpg" in cat.search(vector=queries[0], k=3).image_ids
        assert "L03/1.jpg" not in cat.search(vector=queries[0], k=400).image_ids
    after = header(path)  # on close the new row was appended to the same generation
    assert after["generation"] == before["generation"]
    assert after["n_rows"] == 301 and after["n_alive"] == 300 and after["seq"] > before["seq"]
    assert got == store_answers(path, queries, monkeypatch)


@pytest.mark.parametrize(
    "damage",
    ["image ids", "digest", "truncated vectors", "other model", "garbage header", "lost rows"],
)
def test_stale_or_corrupt_files_are_rebuilt_from_the_store(catalog, damage, monkeypatch):
    path, rng = catalog
    head = header(path)
    gen = path / "engine" / head["generation"]
    if damage == "image ids":
        blob = bytearray((gen / "image_ids.txt").read_bytes())
        blob[3] ^= 0x01  # another image id: the digest no longer matches
        (gen / "image_ids.txt").write_bytes(bytes(blob))
    elif damage == "digest":
        head["digest"] = "0" * 32
    elif damage == "truncated vectors":
        with open(gen / "vectors.f32", "r+b") as fh:
            fh.truncate(100 * 16 * 4)
    elif damage == "other model":
        head["model"]["version"] = "2"
    elif damage == "garbage header":
        (path / "engine" / "header.json").write_text("{not json")
    else:  # the store lost rows the files still hold (another catalog.db put in place)
        with lookalike.open_catalog(path) as cat:  # no search: the files are not touched
            cat.delete("L00/0.jpg")
        head = header(path)
        head["seq"] += 1000  # and the files claim to be newer than every change
    if damage not in ("image ids", "truncated vectors", "garbage header"):
        (path / "engine" / "header.json").write_text(json.dumps(head))
    queries = oracle.quantized(rng, 2, 16)
    with lookalike.open_catalog(path) as cat:
        got = answers(cat, queries)
        assert cat.stats()["cache_source"] == "store"
    assert header(path)["generation"] != head.get("generation")  # rewritten
    assert got == store_answers(path, queries, monkeypatch)
    with lookalike.open_catalog(path) as cat:  # and the new files are good
        assert answers(cat, queries) == got
        assert cat.stats()["cache_source"] == "files"


def test_a_corrupt_vector_is_caught_in_the_background(catalog, monkeypatch):
    path, rng = catalog
    head = header(path)
    picks = set(np.linspace(0, 299, CHECKED_ROWS).astype(int).tolist())  # checked at load
    row = next(r for r in range(300) if r not in picks)
    vectors = np.memmap(path / "engine" / head["generation"] / "vectors.f32", np.float32, "r+")
    vectors[row * 16] += 1.0  # one value of one row the foreground check does not read
    vectors.flush()
    del vectors
    with lookalike.open_catalog(path) as cat:
        cat.search(vector=np.ones(16), k=1)
        source = cat._engines.source
        assert source.from_files  # the foreground checks passed
        assert source.await_verified(30) is False  # the background one did not
        q = oracle.quantized(rng, 1, 16)
        got = answers(cat, q)  # the next search read the store
        assert cat.stats()["cache_source"] == "store"
    assert got == store_answers(path, q, monkeypatch)


def test_the_first_searches_of_a_cold_process_do_not_wait_for_the_codes(catalog, monkeypatch):
    path, rng = catalog
    monkeypatch.setattr(engines_mod, "WARM_VALUES", 0)  # every engine builds in the background
    queries = oracle.quantized(rng, 2, 16)
    with lookalike.open_catalog(path) as cat:
        first = answers(cat, queries)  # numpy answers while the int8 codes are encoded
        assert cat._engines.await_engine(30)
        cat.search(vector=queries[0], k=1)
        assert cat.stats()["engine"] == "fast" and cat.stats()["codes_bytes"] > 0
        assert answers(cat, queries) == first


def test_files_can_be_switched_off(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOKALIKE_ENGINE_FILES", "0")
    with lookalike.open_catalog(tmp_path / "cat") as cat:
        cat.add_vectors(["a"], ["a/1"], np.ones((1, 16)), model=MODEL)
        cat.search(vector=np.ones(16), k=1)
    assert not (tmp_path / "cat" / "engine").exists()


def test_stats_reads_the_counts_from_a_fresh_header(catalog, monkeypatch):
    from lookalike.store.sqlite import SqliteStore

    path, _ = catalog

    def no_scan(self):
        raise AssertionError("the store's keys were scanned")

    with lookalike.open_catalog(path) as cat:
        with monkeypatch.context() as m:
            m.setattr(SqliteStore, "count_listings", no_scan)
            facts = cat.stats()  # no write since the files: their header has the counts
        assert (facts["images"], facts["listings"]) == (300, 60)
        assert not cat.engine_loaded
        cat.delete("L07/0.jpg")
        for i in range(5):
            cat.delete(f"L08/{i}.jpg")
        facts = cat.stats()  # the store changed: counted by the store
        assert (facts["images"], facts["listings"]) == (294, 59)


def test_two_writers_of_the_files_never_mix_their_rows(catalog, monkeypatch):
    """Two catalogs on one folder (as two processes) map the files, each sees the other's
    rows through the store, and each writes the files on close: the second finds them
    changed under it and writes a new generation. The result maps and answers as the store."""
    path, rng = catalog
    a, b = lookalike.open_catalog(path), lookalike.open_catalog(path)
    q = np.full(16, 0.25, np.float32)
    a.search(vector=q, k=1)
    b.search(vector=q, k=1)  # both mapped the same files
    a.add_vectors(["xa"], ["xa/0.jpg"], q[None, :], model=MODEL, normalize=False)
    b.add_vectors(["xb"], ["xb/0.jpg"], q[None, :] * 2, model=MODEL, normalize=False)
    for cat in (a, b):  # each cache applies both rows, in its own order
        assert {"xa/0.jpg", "xb/0.jpg"} <= set(cat.search(vector=q, k=5).image_ids)
    gen = header(path)["generation"]
    a.close()
    assert header(path)["generation"] == gen and header(path)["n_rows"] == 302  # appended
    b.close()
    assert header(path)["generation"] != gen  # b's rows 300.. differ from a's: rewritten
    queries = [q, *oracle.quantized(rng, 2, 16)]
    with lookalike.open_catalog(path) as cat:
        got = answers(cat, queries)
        assert cat.stats()["cache_source"] == "files"
        assert cat._engines.source.await_verified(30)
    assert got == store_answers(path, queries, monkeypatch)


def test_a_compaction_writes_a_new_generation(catalog, monkeypatch):
    path, rng = catalog
    gen = header(path)["generation"]
    with lookalike.open_catalog(path) as cat:
        cat.search(vector=np.ones(16), k=1)  # mapped
        for i in range(20):  # a third of the rows: the cache compacts
            for j in range(5):
                cat.delete(f"L{i:02d}/{j}.jpg")
        cat.search(vector=np.ones(16), k=1)
    head = header(path)
    assert head["generation"] != gen and head["n_rows"] == head["n_alive"] == 200
    assert not (path / "engine" / gen).exists()  # the old generation is removed
    queries = oracle.quantized(rng, 2, 16)
    with lookalike.open_catalog(path) as cat:
        got = answers(cat, queries)
        assert cat.stats()["cache_source"] == "files"
    assert got == store_answers(path, queries, monkeypatch)


def test_the_first_load_builds_the_files_batch_by_batch(tmp_path, monkeypatch):
    """Without files, the first load streams the store's rows into them one batch at a time
    (a collection larger than RAM) and maps them; rows written while the batches are read
    (a replaced row already passed, a deleted one not reached yet, a new one) are applied after,
    and the chunk digests span batch boundaries (a new process verifies every vector)."""
    from lookalike.catalog import cachesource
    from lookalike.engine import mapped
    from lookalike.store.sqlite import SqliteStore

    monkeypatch.setattr(cachesource, "BUILD_BATCH", 7)  # 300 rows: 43 batches
    monkeypatch.setattr(mapped, "CHUNK_ROWS", 16)  # chunks that straddle the batches
    rng = np.random.default_rng(11)
    path = tmp_path / "cat"
    write_catalog(path, rng)
    assert not (path / "engine" / "header.json").exists()
    sizes: list[int] = []
    read = SqliteStore.iter_vectors
    writer = lookalike.open_catalog(path)  # another connection writes between the batches

    def spy(self, batch_size=65536):
        for i, batch in enumerate(read(self, batch_size)):
            sizes.append(len(batch[0]))
            if i == 3:
                writer.add_vectors(["L00"], ["L00/0.jpg"], np.full((1, 16), 0.5), model=MODEL)
                writer.add_vectors(["zz"], ["zz/0.jpg"], np.full((1, 16), 0.25), model=MODEL)
                writer.delete("L50/2.jpg")
            yield batch

    monkeypatch.setattr(SqliteStore, "iter_vectors", spy)
    queries = [np.full(16, 0.5, np.float32), *oracle.quantized(rng, 2, 16)]
    try:
        with lookalike.open_catalog(path) as cat:
            got = answers(cat, queries)
            facts = cat.stats()
            assert facts["cache_source"] == "store" and facts["images"] == 300
            assert cat.search(vector=queries[0], k=1).image_ids == ["L00/0.jpg"]
            assert "L50/2.jpg" not in cat.search(vector=queries[0], k=400).image_ids
    finally:
        writer.close()
    assert max(sizes) == 7 and sum(sizes) >= 299  # batch by batch, every row
    assert got == store_answers(path, queries, monkeypatch)
    monkeypatch.setattr(SqliteStore, "iter_vectors", read)  # as a new process: maps the files
    # and verifies every chunk digest (CHUNK_ROWS as written)
    with lookalike.open_catalog(path) as cat:
        assert answers(cat, queries) == got
        assert cat.stats()["cache_source"] == "files"
        assert cat._engines.source.await_verified(30)


def test_rows_the_files_cannot_hold_leave_them_as_they_were(tmp_path):
    """Batches out of key order, or of another dimension, are refused, and a build that fails
    midway (a full disk) leaves no half-written generation: no header, no files."""
    from lookalike.engine.mapped import EngineFiles

    files = EngineFiles(tmp_path / "engine", {"name": "external", "version": "1", "dim": 4})
    good = np.ones((2, 4), np.float32)
    for batches in (
        [([("b", "1"), ("b", "2")], good), ([("a", "1"), ("a", "2")], good)],
        [([("a", "1"), ("a", "2")], np.ones((2, 3), np.float32))],
    ):
        with files.exclusive():
            assert files.build(5, iter(batches)) is False
        assert files.load() is None and not list((tmp_path / "engine").glob("g-*"))

    def failing():
        yield [("a", "1")], good[:1]
        raise OSError(28, "No space left on device")

    with files.exclusive(), pytest.raises(OSError, match="No space"):
        files.build(5, failing())
    assert files.load() is None and not list((tmp_path / "engine").glob("g-*"))  # no half
    with files.exclusive():
        assert files.build(5, iter([([("a", "1"), ("b", "1")], good)])) is True
    cache = files.load()
    assert cache is not None and cache.n_rows == 2 and cache.seq == 5
    assert list(cache.keys) == [("a", "1"), ("b", "1")] and files.verify_vectors(cache.vectors)


def test_a_file_larger_than_memory_maps_copy_on_write(tmp_path):
    """The vector file of a collection larger than RAM + swap maps (np.memmap's copy-on-write
    mode is refused with ENOMEM there: its whole length is charged to the commit limit); a
    write stays in the process, and a file shorter than asked is an error."""
    from lookalike.files import map_private

    mode = Path("/proc/sys/vm/overcommit_memory").read_text().strip()
    if mode == "2":
        pytest.skip("strict overcommit accounting: no mapping larger than the commit limit")
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    total = sum(int(meminfo[k].split()[0]) * 1024 for k in ("MemTotal", "SwapTotal"))
    path = tmp_path / "big.f32"
    rows = total // (4 * 512) + 1024
    with open(path, "wb") as fh:
        fh.truncate(rows * 4 * 512)  # sparse: no disk used
    if mode == "0":  # the default heuristic refuses the whole length up front
        with pytest.raises(OSError):
            np.memmap(path, dtype=np.float32, mode="c", shape=(rows, 512))
    vectors = map_private(path, np.float32, (rows, 512))
    assert vectors.shape == (rows, 512) and vectors[rows - 1, 7] == 0.0
    vectors[3, 0] = 1.5
    assert vectors[3, 0] == 1.5
    assert np.fromfile(path, dtype=np.float32, count=4 * 512)[3 * 512] == 0.0  # file unchanged
    del vectors
    with pytest.raises(OSError, match="shorter"):
        map_private(path, np.float32, (rows + 1, 512))


def test_rows_that_cannot_fit_in_ram_are_refused_with_a_clear_error(catalog, monkeypatch):
    """Without engine files the rows are read into RAM; when they would not fit, the search
    says so in one line (how much, and why the files are not used) instead of exhausting
    the machine's memory."""
    from lookalike.catalog import cachesource
    from lookalike.errors import StoreError

    path, _ = catalog
    monkeypatch.setenv("LOOKALIKE_ENGINE_FILES", "0")
    monkeypatch.setattr(cachesource, "ram_bytes", lambda: 300 * 16 * 4)  # the rows need more
    refused = pytest.raises(StoreError, match=r"need .* GiB of RAM .*LOOKALIKE_ENGINE_FILES=0")
    with lookalike.open_catalog(path) as cat, refused:
        cat.search(vector=np.ones(16), k=1)
    monkeypatch.setattr(cachesource, "ram_bytes", lambda: 10 * 300 * 16 * 4)  # they fit
    with lookalike.open_catalog(path) as cat:
        assert len(cat.search(vector=np.ones(16), k=1).hits) == 1
