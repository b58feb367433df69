"""The Catalog facade: search options vs the oracle, writes, model checks, multi-process sync."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import lookalike
import oracle
from lookalike.errors import ModelMismatchError, NotFoundError, QueryError
from lookalike.types import ModelInfo

MODEL = ModelInfo("external", "1", 8)


@pytest.fixture
def vec_catalog(store_location):
    """A catalog of 60 quantized vectors in 12 listings with stock levels and colours, on
    every store backend: all search options must answer the same on SQLite and PostgreSQL."""
    rng = np.random.default_rng(42)
    keys = [(f"L{i:02d}", f"L{i:02d}/{j}.jpg") for i in range(12) for j in range(5)]
    vectors = oracle.quantized(rng, len(keys), 8)
    cat = lookalike.open_catalog(store_location)
    cat.add_vectors(
        [k[0] for k in keys], [k[1] for k in keys], vectors, model=MODEL, normalize=False
    )
    stock = {}
    for i in range(12):
        stock[f"L{i:02d}"] = i % 3  # 0, 1, 2, ...
        cat.update_listing(f"L{i:02d}", stock_level=i % 3, color="red" if i < 6 else "blue")
    yield cat, keys, vectors, stock, rng
    cat.close()


def as_tuples(result):
    return [(h.listing_id, h.image_id, h.score) for h in result.hits]


@pytest.mark.parametrize("group_by", [None, "listing"])
@pytest.mark.parametrize("agg", ["max", "mean", "sum-top-n"])
def test_search_options_match_the_oracle(vec_catalog, group_by, agg):
    cat, keys, vectors, _stock, rng = vec_catalog
    for _ in range(3):
        q = oracle.quantized(rng, 1, 8)[0]
        for kwargs in (dict(k=5), dict(k=None, threshold=0.25), dict(k=3, threshold=0.0)):
            got = cat.search(
                vector=q, group_by=group_by, agg=agg, top_n=2, normalize=False, **kwargs
            )
            want = oracle.search(keys, vectors, q, group_by=group_by, agg=agg, top_n=2, **kwargs)
            assert as_tuples(got) == want


def test_where_filters_match_the_oracle(vec_catalog):
    cat, keys, vectors, stock, rng = vec_catalog
    q = oracle.quantized(rng, 1, 8)[0]
    got = cat.search(vector=q, k=10, where="stock_level > 0 and color = 'blue'", normalize=False)
    want = oracle.search(
        keys, vectors, q, k=10, listing_ok=lambda lid: stock[lid] > 0 and int(lid[1:]) >= 6
    )
    assert as_tuples(got) == want and len(want) == 10


def test_listing_updates_are_seen_by_the_next_search(vec_catalog):
    cat, _keys, vectors, _stock, _rng = vec_catalog
    q = vectors[0]
    first = cat.search(vector=q, k=1, group_by="listing", where="stock_level >= 0", normalize=False)
    top = first.hits[0].listing_id
    cat.update_listing(top, stock_level=-5)
    after = cat.search(
        vector=q, k=60, group_by="listing", where="stock_level >= 0", normalize=False
    )
    assert top not in after.listing_ids


def test_unknown_where_attribute_is_a_clear_error(vec_catalog):
    cat, *_ = vec_catalog
    with pytest.raises(QueryError, match=r"unknown listing attribute.*stok_level.*known:"):
        cat.search(vector=np.ones(8), where="stok_level > 0")


def test_save_writes_query_results(vec_catalog):
    cat, _keys, vectors, _stock, _rng = vec_catalog
    res = cat.search(vector=vectors[3], k=4, save=True)
    assert res.saved
    stored = cat.saved_results(res.query_id).hits
    assert [(r.listing_id, r.image_id) for r in stored] == [
        (h.listing_id, h.image_id) for h in res.hits
    ]
    np.testing.assert_allclose([r.score for r in stored], res.scores, rtol=1e-6)
    assert [r.rank for r in stored] == [1, 2, 3, 4]


def test_batch_of_vectors_returns_one_result_per_row(vec_catalog):
    cat, _keys, vectors, _stock, _rng = vec_catalog
    results = cat.search_batch(vectors[:3], k=2)
    assert isinstance(results, list) and len(results) == 3
    assert len({r.query_id for r in results}) == 3


def test_search_by_stored_id(vec_catalog):
    cat, _keys, _vectors, *_ = vec_catalog
    res = cat.search(image_id="L04/2.jpg", k=1, normalize=False)
    assert res.hits[0].image_id == "L04/2.jpg"
    with pytest.raises(NotFoundError):
        cat.search(image_id="nope.jpg")


def test_ambiguous_image_id_needs_the_listing(vec_catalog):
    cat, *_ = vec_catalog
    cat.add_vectors(["other"], ["L04/2.jpg"], np.ones((1, 8)), model=MODEL)
    with pytest.raises(QueryError, match="in 2 listings"):
        cat.search(image_id="L04/2.jpg")
    assert cat.search(image_id="L04/2.jpg", listing_id="other", k=1).hits[0].listing_id == "other"


def test_delete_is_reflected_in_the_next_search(vec_catalog):
    cat, _keys, vectors, *_ = vec_catalog
    before = cat.search(vector=vectors[7], k=1, normalize=False)
    victim = before.hits[0]
    assert cat.delete(victim.image_id) == 1
    after = cat.search(vector=vectors[7], k=60)
    assert victim.image_id not in after.image_ids
    assert cat.stats()["images"] == 59


def test_nan_query_vector_is_refused(vec_catalog):
    cat, *_ = vec_catalog
    with pytest.raises(QueryError, match="NaN"):
        cat.search(vector=np.full(8, np.nan))


def test_exactly_one_query_kind(vec_catalog):
    cat, *_ = vec_catalog
    with pytest.raises(QueryError, match="exactly one"):
        cat.search()
    with pytest.raises(QueryError, match="exactly one"):
        cat.search(image_id="x", vector=np.ones(8))


def test_wrong_dimension_vectors_are_refused(vec_catalog):
    cat, *_ = vec_catalog
    with pytest.raises(ModelMismatchError, match="d=8"):
        cat.add_vectors(["a"], ["a/1"], np.ones((1, 9)), model=MODEL)
    with pytest.raises(ModelMismatchError, match="refusing vectors of other@1"):
        cat.add_vectors(["a"], ["a/1"], np.ones((1, 8)), model=ModelInfo("other", "1", 8))
    assert cat.stats()["images"] == 60


def test_catalog_of_one_extractor_refuses_another(tmp_path, demo_dir):
    path = tmp_path / "hogcat"
    with lookalike.open_catalog(path, extractor="hog") as cat:
        cat.index([demo_dir / "photos" / "coins"])
    with pytest.raises(ModelMismatchError, match="holds 'hog' vectors"):
        lookalike.open_catalog(path, extractor="cnn")
    with lookalike.open_catalog(path) as cat:  # no extractor given: uses the stored one
        assert cat.extractor.info.name == "hog"
        with pytest.raises(ModelMismatchError, match="refusing vectors of cnn"):
            cat.add_vectors(
                ["x"], ["x/1"], np.ones((1, 1280)), model=lookalike.get_extractor("cnn").info
            )


def test_empty_catalog_search_is_a_clear_error(tmp_path):
    with (
        lookalike.open_catalog(tmp_path / "empty") as cat,
        pytest.raises(QueryError, match="empty"),
    ):
        cat.search(vector=np.ones(8))


def test_engine_picks_up_another_process_writes(vec_catalog):
    """Incremental sync: rows written and deleted by another process appear in the next search."""
    cat, _keys, _vectors, *_ = vec_catalog
    assert cat.vector_cache().n_rows == 60
    code = textwrap.dedent(f"""
        import numpy as np, lookalike
        from lookalike.types import ModelInfo
        cat = lookalike.open_catalog({cat.uri!r})
        cat.add_vectors(["new"], ["new/1.jpg"], np.full((1, 8), 0.5),
                        model=ModelInfo("external", "1", 8))
        cat.delete("L00/0.jpg")
    """)
    subprocess.run([sys.executable, "-c", code], check=True)
    res = cat.search(vector=np.full(8, 0.5), k=1)
    assert res.hits[0].image_id == "new/1.jpg"
    everything = cat.search(vector=np.ones(8), k=100)
    assert "L00/0.jpg" not in everything.image_ids and len(everything.hits) == 60
    assert cat.stats()["cache_rows"] == 61  # appended, not reloaded (the dead row is masked)


def test_image_search_and_id_search_on_real_photos(cnn_catalog_dir, demo_dir):
    with lookalike.open_catalog(cnn_catalog_dir) as cat:
        res = cat.search(demo_dir / "queries" / "coffee" / "q-01.jpg", k=3, group_by="listing")
        assert res.hits[0].listing_id == "coffee" and res.hits[0].n_images == 6
        by_id = cat.search(image_id="coffee/coffee-02.jpg", k=6)
        assert by_id.hits[0].image_id == "coffee/coffee-02.jpg"
        assert by_id.hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert set(by_id.listing_ids) == {"coffee"}
        in_stock = cat.search(
            demo_dir / "queries" / "coffee" / "q-01.jpg",
            k=3,
            group_by="listing",
            where="stock_level > 0",
        )
        assert "coffee" not in in_stock.listing_ids  # the demo's coffee is out of stock


def test_add_single_image_then_update_and_unchanged(cnn_catalog_copy, demo_dir):
    with lookalike.open_catalog(cnn_catalog_copy) as cat:
        q = demo_dir / "queries" / "rocket" / "q-02.jpg"
        assert cat.add(q, "new-rocket", "new-rocket/1.jpg") == "added"
        assert cat.add(q, "new-rocket", "new-rocket/1.jpg") == "unchanged"
        assert (
            cat.add(demo_dir / "queries" / "moon" / "q-01.jpg", "new-rocket", "new-rocket/1.jpg")
            == "updated"
        )
        res = cat.search(q, k=1, group_by="listing")
        assert res.hits[0].listing_id == "rocket"
        assert (
            cat.search(image_id="new-rocket/1.jpg", k=2, group_by="listing").hits[1].listing_id
            == "moon"
        )


@pytest.mark.parametrize("codes", ["int8", "float16", "float32"])
def test_every_code_kind_gives_the_same_answers(vec_catalog, codes):
    cat, keys, vectors, _stock, rng = vec_catalog
    assert cat.configure(codes=codes, rerank=2) == {"codes": codes, "rerank": "2", "index": "auto"}
    stats = cat.stats()
    assert stats["engine"] == "fast" and stats["codes"] == codes
    q = oracle.quantized(rng, 1, 8)[0]
    for kwargs in (dict(k=7), dict(k=4, group_by="listing", agg="mean")):
        got = cat.search(vector=q, normalize=False, **kwargs)
        assert as_tuples(got) == oracle.search(keys, vectors, q, **kwargs)


def test_settings_are_stored_with_the_catalog(vec_catalog):
    cat, *_ = vec_catalog
    cat.configure(codes="float16")
    with lookalike.open_catalog(cat.uri) as again:
        assert again.settings["codes"] == "float16"
        assert again.stats()["codes"] == "float16"
    with pytest.raises(lookalike.LookalikeError, match="unknown codes"):
        cat.configure(codes="int4")


def test_numpy_fallback_warns_when_the_kernels_are_missing(vec_catalog, monkeypatch):
    import lookalike.engine as engine_mod

    cat, keys, vectors, _stock, _rng = vec_catalog
    monkeypatch.setattr(engine_mod, "kernels_available", lambda: (False, "not built"))
    with lookalike.open_catalog(cat.uri) as fresh:
        with pytest.warns(RuntimeWarning, match="compiled scan kernels unavailable"):
            res = fresh.search(vector=vectors[0], k=3, normalize=False)
        assert fresh.stats()["engine"] == "numpy"
        assert as_tuples(res) == oracle.search(keys, vectors, vectors[0], k=3)
    with pytest.raises(lookalike.LookalikeError, match="unavailable"):
        engine_mod.make_engine(engine_mod.VectorCache(8), "fast")


def test_zero_query_vector_is_refused(vec_catalog):
    cat, *_ = vec_catalog
    for q in (np.zeros(8), np.full(8, 1e-9), np.eye(8)[3] * 1e-7):
        with pytest.raises(QueryError, match="query vector has zero length"):
            cat.search(vector=q)
    batch = np.stack([np.eye(8)[0], np.zeros(8), np.eye(8)[1]])
    with pytest.raises(QueryError, match="zero length \\(row 1 of 3\\)"):
        cat.search_batch(batch)
    # without normalization a zero vector is a legal (if useless) query
    assert all(h.score == 0 for h in cat.search(vector=np.zeros(8), normalize=False).hits)


def test_small_and_huge_query_vectors_search_like_unit_ones(vec_catalog):
    cat, _keys, _vectors, _stock, rng = vec_catalog
    q = rng.standard_normal(8)
    unit = cat.search(vector=q, k=5)
    for scale in (1e-5, 1e30, 1e38):
        got = cat.search(vector=q * scale, k=5)
        assert [h.image_id for h in got.hits] == [h.image_id for h in unit.hits]
        assert np.allclose([h.score for h in got.hits], [h.score for h in unit.hits], atol=1e-6)
