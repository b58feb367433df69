"""ANN indexes (faiss IVF, IVF-PQ, HNSW) behind the catalog: recall, updates, persistence."""

from __future__ import annotations

import numpy as np
import pytest

import lookalike
from lookalike.catalog import engines as catalog_engines
from lookalike.errors import QueryError
from lookalike.types import ModelInfo

D = 32
MODEL = ModelInfo("external", "1", D)


def clustered(rng: np.random.Generator, n: int, centres: int = 50) -> np.ndarray:
    """Unit vectors around random centres: the structure real embeddings have."""
    c = rng.standard_normal((centres, D)).astype(np.float32)
    x = c[rng.integers(0, centres, n)] + 1.0 * rng.standard_normal((n, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def big_catalog(tmp_path):
    rng = np.random.default_rng(0)
    x = clustered(rng, 20_000)
    cat = lookalike.open_catalog(tmp_path / "cat")
    ids = [f"L{i // 5:05d}" for i in range(len(x))]
    cat.add_vectors(ids, [f"{i:06d}" for i in range(len(x))], x, model=MODEL)
    yield cat, x, rng
    cat.close()


def recall_at_10(cat, queries, index) -> float:
    exact = cat.search_batch(queries, k=10, index="exact")
    approx = cat.search_batch(queries, k=10, index=index)
    return float(
        np.mean(
            [
                len(set(a.image_ids) & set(e.image_ids)) / 10
                for a, e in zip(approx, exact, strict=True)
            ]
        )
    )


@pytest.mark.parametrize(("kind", "floor"), [("ivf", 0.9), ("hnsw", 0.95), ("ivfpq", 0.85)])
def test_recall_above_floor_and_scores_exact(big_catalog, kind, floor):
    cat, x, rng = big_catalog
    ann = cat.build_index(kind)
    assert ann.ntotal == len(x)
    queries = clustered(rng, 50)
    r = recall_at_10(cat, queries, kind)
    print(f"{kind}: recall@10 {r:.3f}")
    assert r >= floor
    res = cat.search(vector=queries[0], k=5, index=kind)
    for hit in res.hits:  # scores are exact inner products, whatever found the row
        assert hit.score == pytest.approx(float(x[int(hit.image_id)] @ queries[0]), abs=1e-5)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_index_follows_inserts_and_deletes(big_catalog, kind):
    cat, x, _rng = big_catalog
    cat.build_index(kind)
    new = clustered(np.random.default_rng(9), 3)
    cat.add_vectors(["new"] * 3, ["n0", "n1", "n2"], new, model=MODEL)
    assert cat.search(vector=new[1], k=1, index=kind).hits[0].image_id == "n1"
    victim = cat.search(vector=x[123], k=1, index=kind).hits[0].image_id
    assert victim == "000123"
    cat.delete("000123")
    assert "000123" not in cat.search(vector=x[123], k=10, index=kind).image_ids


def test_saved_index_is_loaded_and_reconciled(big_catalog, tmp_path):
    cat, x, _rng = big_catalog
    cat.build_index("hnsw")
    assert (cat.ann_folder / "hnsw.faiss").exists()
    uri = cat.uri
    with lookalike.open_catalog(uri) as other:  # another process writes, without the index
        other.add_vectors(["late"], ["late-1"], clustered(np.random.default_rng(5), 1), model=MODEL)
        other.delete("000007")
    with lookalike.open_catalog(uri) as again:
        late = again.get_image_vector("late-1")
        assert again.search(vector=late, k=1, index="hnsw").hits[0].image_id == "late-1"
        assert "000007" not in again.search(vector=x[7], k=10, index="hnsw").image_ids


def test_filters_still_fill_k_with_ann(big_catalog):
    cat, x, _rng = big_catalog
    cat.build_index("hnsw")
    for i in range(0, 4000, 5):
        cat.update_listing(f"L{i // 5:05d}", stock_level=1 if (i // 5) % 10 == 0 else 0)
    res = cat.search(vector=x[3], k=10, index="hnsw", where="stock_level > 0")
    assert len(res.hits) == 10
    assert all(int(h.listing_id[1:]) % 10 == 0 for h in res.hits)


def test_auto_uses_ann_only_for_large_collections(big_catalog, monkeypatch):
    cat, x, _rng = big_catalog
    cat.search(vector=x[0], k=1)
    assert cat.search_engine().name == "fast"  # no index built yet
    cat.build_index("ivf")
    assert cat.search_engine().name == "fast"  # 20k x 32 bytes: below the threshold
    monkeypatch.setattr(catalog_engines, "ANN_AUTO_BYTES", 1000)
    assert cat.search_engine().name == "ann"
    cat.configure(index="exact")
    assert cat.search_engine().name == "fast"


def test_missing_index_is_a_clear_error(big_catalog):
    cat, x, _rng = big_catalog
    with pytest.raises(QueryError, match="no ivfpq index"):
        cat.search(vector=x[0], index="ivfpq")


def test_too_few_vectors_to_train(tmp_path):
    with lookalike.open_catalog(tmp_path / "small") as cat:
        cat.add_vectors(
            ["a"] * 10,
            [str(i) for i in range(10)],
            np.random.default_rng(1).standard_normal((10, D)),
            model=MODEL,
        )
        with pytest.raises(lookalike.LookalikeError, match="too few"):
            cat.build_index("ivf", nlist=64)


def test_ann_engine_is_a_search_engine_but_not_exact():
    from lookalike.engine import NumpyEngine, SearchEngine, VectorCache
    from lookalike.engine.ann import AnnEngine, AnnIndex, AnnParams
    from lookalike.types import Changes, SearchSpec

    rng = np.random.default_rng(3)
    x = clustered(rng, 2000)
    cache = VectorCache(D)
    keys = [(f"L{i // 4:04d}", f"{i:05d}") for i in range(len(x))]
    cache.apply(Changes(seq=1, upserted=keys, vectors=x, deleted=[]))
    engine = AnnEngine(cache, AnnIndex.build(cache, AnnParams(kind="hnsw")))
    assert isinstance(engine, SearchEngine) and not isinstance(engine, NumpyEngine)
    assert engine.name == "ann" and engine.exact is False and engine.code_kind == "float32"
    assert engine.nbytes() > len(x) * D * 4  # a flat copy of the vectors plus the graph
    q = x[:3]
    spec = SearchSpec(k=5, group_by="listing")
    for got, want in zip(engine.search(q, spec), NumpyEngine(cache).search(q, spec), strict=True):
        assert got.rows[0] == want.rows[0]  # the query's own listing, found by the graph
        assert got.scores[0] == pytest.approx(want.scores[0], abs=1e-5)  # exact re-score
    with pytest.raises(QueryError, match="listing_mask"):
        engine.search(q, SearchSpec(k=5, listing_mask=np.ones(3, bool)))
