"""Spark jobs (real pyspark, local[2], one session for the whole module) give the local
engine's answers; the lake format round-trips; distributed extraction matches local."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

import lookalike
from lookalike.lake import export_catalog, import_catalog, part_of, read_model
from lookalike.types import ModelInfo

pyspark = pytest.importorskip("pyspark", reason="pip install 'lookalike[spark]'")
pytestmark = [
    pytest.mark.spark,
    pytest.mark.skipif(shutil.which("java") is None, reason="Spark needs Java 17"),
]


@pytest.fixture(scope="module")
def spark():
    from lookalike import spark as lsp

    session = lsp.session("local[2]")
    yield session
    session.stop()


@pytest.fixture(scope="module")
def demo_lake(cnn_catalog_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lake")
    with lookalike.open_catalog(cnn_catalog_dir) as cat:
        counts = export_catalog(cat, folder, parts=8)
    assert counts["features"] == 84 and counts["listings"] == 14
    return folder


def assert_same(got, want, atol=1e-5):
    """The same hits with the same scores (within ``atol``: Spark's numpy and the local scan
    kernels sum in different orders) in the same order, except that two hits whose scores
    are that close may swap places (a tie within float32 rounding)."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        g_keys = [(h.listing_id, h.image_id) for h in g.hits]
        w_keys = [(h.listing_id, h.image_id) for h in w.hits]
        assert sorted(g_keys) == sorted(w_keys)
        w_score = {(h.listing_id, h.image_id): h.score for h in w.hits}
        g_scores = np.array([h.score for h in g.hits])
        np.testing.assert_allclose(g_scores, [w_score[key] for key in g_keys], atol=atol)
        for i, (a, b) in enumerate(zip(g_keys, w_keys, strict=True)):
            if a != b:  # only a near-tie may be ordered differently
                assert abs(w_score[a] - w_score[b]) <= atol, (i, a, b)
        w_images = {(h.listing_id, h.image_id): h.n_images for h in w.hits}
        assert [h.n_images for h in g.hits] == [w_images[key] for key in g_keys]


OPTIONS = [
    dict(k=10),
    dict(k=5, group_by="listing"),
    dict(k=4, group_by="listing", agg="mean"),
    dict(k=4, group_by="listing", agg="sum-top-n", top_n=2),
    dict(threshold=0.5),
    dict(threshold=0.3, group_by="listing"),
    dict(k=6, where="stock_level > 0 and category != 'space'"),
    dict(k=3, group_by="listing", where="stock_level >= 2"),
]


def test_spark_search_equals_local_on_the_demo(spark, demo_lake, cnn_catalog_dir, demo_dir):
    from lookalike import spark as lsp

    with lookalike.open_catalog(cnn_catalog_dir) as cat:
        q = cat.embed(
            [demo_dir / "queries" / name / "q-01.jpg" for name in ("chelsea", "rocket", "hubble")]
        )
        for options in OPTIONS:
            assert_same(
                lsp.search(spark, str(demo_lake), q, **options), cat.search_batch(q, **options)
            )


def test_spark_search_equals_local_on_50k_random_vectors(spark, tmp_path):
    from lookalike import spark as lsp

    rng = np.random.default_rng(0)
    n, d = 50_000, 32
    x = rng.standard_normal((n, d)).astype(np.float32)
    with lookalike.open_catalog(tmp_path / "cat") as cat:
        cat.add_vectors(
            [f"L{i % 9000:05d}" for i in range(n)],
            [f"{i:06d}" for i in range(n)],
            x,
            model=ModelInfo("random", "1", d),
        )
        for i in range(0, 9000, 3):
            cat.update_listing(f"L{i:05d}", stock_level=i % 5)
        export_catalog(cat, tmp_path / "lake", parts=16)
        q = rng.standard_normal((4, d)).astype(np.float32)
        for options in [
            *OPTIONS[:-2],
            dict(k=10, where="stock_level > 2"),
            dict(k=5, group_by="listing", where="stock_level = 1"),
        ]:
            assert_same(
                lsp.search(spark, str(tmp_path / "lake"), q, **options),
                cat.search_batch(q, **options),
            )


def test_spark_search_json_is_the_local_json(spark, demo_lake, cnn_catalog_dir):
    from lookalike import spark as lsp

    with lookalike.open_catalog(cnn_catalog_dir) as cat:
        q = cat.get_image_vector("moon/moon-01.jpg")
        got = lsp.search(spark, str(demo_lake), q, k=3, group_by="listing")[0].to_dict()
        want = cat.search(vector=q, k=3, group_by="listing").to_dict()
    assert list(got) == list(want) == ["query_id", "hits"]
    assert [list(h) for h in got["hits"]] == [list(h) for h in want["hits"]]
    assert [(h["listing_id"], h["image_id"], h["n_images"]) for h in got["hits"]] == [
        (h["listing_id"], h["image_id"], h["n_images"]) for h in want["hits"]
    ]


def test_export_import_round_trip_is_bit_for_bit(cnn_catalog_copy, tmp_path):
    with lookalike.open_catalog(cnn_catalog_copy) as cat:
        res = cat.search(image_id="coins/coins-01.jpg", k=3, save=True)
        export_catalog(cat, tmp_path / "lake")
        before = [r for batch in cat.iter_records() for r in batch]
        sha = cat.sha256s()
    assert read_model(tmp_path / "lake").dim == 1280
    with lookalike.open_catalog(tmp_path / "copy") as copy:
        counts = import_catalog(tmp_path / "lake", copy)
        assert counts == {"features": 84, "listings": 14, "query_results": 3}
        after = [r for batch in copy.iter_records() for r in batch]
        assert [r.key for r in after] == [r.key for r in before]
        assert (
            np.stack([r.vector for r in after]).tobytes()
            == np.stack([r.vector for r in before]).tobytes()
        )
        assert copy.sha256s() == sha
        assert copy.get_listing("coffee").attrs == {"stock_level": 0, "category": "food"}
        assert copy.saved_results(res.query_id).image_ids == res.image_ids
    parts = {p.parent.name for p in (tmp_path / "lake" / "features").rglob("*.parquet")}
    assert all(p.startswith("part=") for p in parts)
    for path in (tmp_path / "lake" / "features").rglob("*.parquet"):  # a listing in one file
        t = pq.read_table(path)
        assert t.schema.field("vector").type.list_size == 1280


def test_spark_extraction_equals_local_and_records_bad_images(
    spark, demo_dir, tmp_path, cnn_catalog_dir
):
    import pyarrow as pa

    from lookalike import spark as lsp

    photos = sorted((demo_dir / "photos").rglob("*.jpg"))[:20]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not a jpeg at all")
    rows = [
        {"listing_id": p.parent.name, "image_id": f"{p.parent.name}/{p.name}", "path": str(p)}
        for p in photos
    ]
    rows.append({"listing_id": "broken", "image_id": "broken/1.jpg", "path": str(bad)})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "manifest.parquet")
    counts = lsp.extract(spark, str(tmp_path / "manifest.parquet"), str(tmp_path / "lake"))
    assert counts == {"images": 21, "failed": 1}
    table = pq.read_table(tmp_path / "lake" / "features").to_pandas()
    failed = table[table["error"].notna()]
    assert list(failed["image_id"]) == ["broken/1.jpg"]
    assert "broken.jpg" in failed["error"].iloc[0]
    with lookalike.open_catalog(cnn_catalog_dir) as cat:
        for _, row in table[table["error"].isna()].iterrows():
            local = cat.get_image_vector(row["image_id"])
            assert np.abs(np.asarray(row["vector"], np.float32) - local).max() <= 1e-4
    for part_dir in (tmp_path / "lake" / "features").iterdir():  # one file per part
        if part_dir.name.startswith("part="):
            files = list(part_dir.glob("*.parquet"))
            assert len(files) == 1, part_dir
            lids = set(pq.read_table(files[0], columns=["listing_id"]).column(0).to_pylist())
            assert {part_of(lid, 16) for lid in lids} == {int(part_dir.name[5:])}
    with lookalike.open_catalog(tmp_path / "imported") as imported:  # and it imports
        assert import_catalog(tmp_path / "lake", imported)["features"] == 20


def test_cli_spark_search_prints_the_local_json(demo_lake, demo_dir, cnn_catalog_dir):
    """``lookalike spark search IMAGE -f json`` in its own process (its own Spark session),
    as a user runs it, gives the hits of ``lookalike search IMAGE -f json``."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    exe = str(Path(sys.executable).with_name("lookalike"))
    query = str(demo_dir / "queries" / "coins" / "q-01.jpg")
    common = ["-k", "4", "--group-by", "listing", "--format", "json"]

    def run(*args):
        proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    got = run(
        "spark", "search", query, "--features", str(demo_lake), "--master", "local[1]", *common
    )
    want = run("search", query, "--catalog", str(cnn_catalog_dir), "--no-bands", *common)
    assert got["hits"][0]["listing_id"] == "coins"
    strip = [{k: v for k, v in h.items() if k != "score"} for h in want["hits"]]
    assert [{k: v for k, v in h.items() if k != "score"} for h in got["hits"]] == strip
    np.testing.assert_allclose(
        [h["score"] for h in got["hits"]], [h["score"] for h in want["hits"]], atol=1e-5
    )


def test_mllib_kmeans_and_classifier(spark, demo_lake):
    from sklearn.metrics import adjusted_rand_score

    from lookalike import spark as lsp

    result = lsp.kmeans(spark, str(demo_lake), k=14)
    a = result["assignments"]
    assert sum(result["sizes"].values()) == 84
    assert adjusted_rand_score(a["listing_id"], a["cluster"]) >= 0.7
    report = lsp.train_classifier(spark, str(demo_lake), model="logreg")
    assert report["n_test"] > 0 and report["accuracy"] >= 0.8


def test_batch_query_table_to_results_table(spark, demo_lake, demo_dir, cnn_catalog_dir, tmp_path):
    """Many queries at once: a query table (image paths, or vectors) -> a results table that
    keeps the table's query ids; a bad row is named."""
    import pyarrow as pa

    from lookalike import spark as lsp
    from lookalike.errors import QueryError
    from lookalike.extract import get_extractor

    names = ["chelsea", "rocket", "coins"]
    paths = [str(demo_dir / "queries" / n / "q-02.jpg") for n in names]
    pq.write_table(
        pa.table({"query_id": [f"q-{n}" for n in names], "path": paths}),
        tmp_path / "queries.parquet",
    )
    ids, q = lsp.read_query_table(str(tmp_path / "queries.parquet"), get_extractor("cnn"))
    assert ids == ["q-chelsea", "q-rocket", "q-coins"] and q.shape == (3, 1280)
    results = lsp.search(
        spark, str(demo_lake), q, k=2, group_by="listing", save=str(tmp_path / "out"), query_ids=ids
    )
    assert [r.hits[0].listing_id for r in results] == names
    saved = pq.read_table(tmp_path / "out").to_pandas()
    assert sorted(set(saved["query_id"])) == sorted(ids) and len(saved) == 6
    top = saved[saved["rank"] == 1].set_index("query_id")["listing_id"].to_dict()
    assert top == {f"q-{n}": n for n in names}
    with lookalike.open_catalog(cnn_catalog_dir) as cat:  # vectors table: same hits as local
        v = np.stack([cat.get_image_vector(f"{n}/{n}-03.jpg") for n in names])
    pq.write_table(
        pa.table({"vector": pa.array(list(v), pa.list_(pa.float32()))}),
        tmp_path / "vectors.parquet",
    )
    ids, qv = lsp.read_query_table(str(tmp_path / "vectors.parquet"), None)
    assert ids == ["0", "1", "2"]
    with lookalike.open_catalog(cnn_catalog_dir) as cat:
        assert_same(lsp.search(spark, str(demo_lake), qv, k=5), cat.search_batch(v, k=5))
    (tmp_path / "bad.csv").write_text(f"query_id,path\nok,{paths[0]}\nnope,{tmp_path}/x.jpg\n")
    with pytest.raises(QueryError, match=r"row 1 \(query_id nope\).*x\.jpg"):
        lsp.read_query_table(str(tmp_path / "bad.csv"), get_extractor("cnn"))
