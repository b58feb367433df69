"""The int8 codes' error bound (codes.py) on the distributions that crowd scores together:
every row's scan score within the margin of its exact score, on random, non-negative, offset
and clustered vectors and on the real ``cnn`` and ``hog`` features of the demo photos; the
margin tight enough that the rows re-scored per query stay near ``rerank * k``; every kernel
instruction set the CPU has giving the same integer sums and the exact answers."""

from __future__ import annotations

import numpy as np
import pytest

import lookalike
from lookalike.engine import NumpyEngine, VectorCache
from lookalike.engine import _kernels as kernels
from lookalike.engine.codes import CodeTable, PreparedQuery
from lookalike.engine.fast import FastEngine
from lookalike.engine.refine import RowFilter
from lookalike.types import Changes, SearchSpec

ISAS = kernels.isas()


@pytest.fixture(params=ISAS)
def isa(request):
    """Every kernel instruction set this CPU supports."""
    kernels.set_isa(request.param)
    yield request.param
    kernels.set_isa("auto")


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_cache(vectors: np.ndarray, per_listing: int = 4) -> VectorCache:
    cache = VectorCache(vectors.shape[1])
    keys = [(f"L{i // per_listing:06d}", f"{i:07d}") for i in range(len(vectors))]
    cache.apply(Changes(seq=1, upserted=keys, vectors=vectors, deleted=[]))
    return cache


def distribution(name: str, rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """``(n, d)`` unit vectors; the queries of a test come from the same distribution."""
    if name == "random":
        return unit(rng.standard_normal((n, d)))
    if name == "nonneg":  # like pooled ReLU features and HOG
        return unit(np.abs(rng.standard_normal((n, d))))
    if name == "offset":  # a large common component: every score close to every other
        return unit(rng.standard_normal((n, d)) * 0.2 + 3.0)
    centres = rng.standard_normal((20, d)) + 1.0  # clustered
    return unit(centres[rng.integers(0, 20, n)] + 0.3 * rng.standard_normal((n, d)))


def unpack(table: CodeTable, n: int) -> np.ndarray:
    """``(n, d)`` int8-table codes from the packed layout of ``_kernels.c``."""
    blocks = (n + 15) // 16
    packed = table.data[: blocks * 16 * table.dp].reshape(blocks, table.dp // 4, 16, 4)
    return packed.transpose(0, 2, 1, 3).reshape(blocks * 16, table.dp)[:n, : table.dim]


def assert_bounds(cache: VectorCache, queries: np.ndarray) -> list[PreparedQuery]:
    """Fine (kernel) and coarse (recomputed from the codes) scores of every row within their
    margins of the exact score, for every query; returns the prepared queries."""
    fast = FastEngine(cache, codes="int8")
    fast.scanner.sync()
    table = fast.table
    x = cache.vectors[: cache.n_rows].astype(np.float64)
    codes = unpack(table, cache.n_rows).astype(np.float64)
    out = []
    for q in queries:
        prepared = fast.scanner.prepare(q)
        exact = x @ q.astype(np.float64)
        fine = fast.scanner.dense(prepared, RowFilter()).astype(np.float64)
        assert np.abs(fine - exact).max() <= prepared.margin
        hi = prepared.buf[: table.dim].astype(np.float64)
        coarse = codes @ hi * prepared.scale + prepared.coarse_offset
        assert np.abs(coarse - exact).max() <= prepared.coarse_margin
        assert prepared.margin <= prepared.coarse_margin <= prepared.margin + prepared.gap
        out.append(prepared)
    return out


@pytest.mark.parametrize("dist", ["random", "nonneg", "offset", "clustered"])
def test_margin_bounds_every_row(dist, isa):
    rng = np.random.default_rng(11)
    x = distribution(dist, rng, 6000, 96)
    queries = distribution(dist, rng, 12, 96)
    prepared = assert_bounds(make_cache(x), queries)
    # tight: the int8 rounding of unit vectors at d = 96 spans ~0.003 per row; the former
    # symmetric scale gave 0.015-0.03 here
    assert max(p.margin for p in prepared) < 0.012


def test_margin_bounds_rows_outside_the_fitted_range():
    """Rows added after the fit may leave its range: they are clamped, the bound grows to
    cover them, and the refit (the collection doubled) fits the new range and mean."""
    rng = np.random.default_rng(4)
    x = distribution("nonneg", rng, 3000, 32)
    cache = make_cache(x)
    fast = FastEngine(cache, codes="int8")
    fast.scanner.sync()
    before = fast.table.max_err_norm
    lo, step, centre = (a.copy() for a in fast.table.fit)
    np.testing.assert_allclose(centre, (x.mean(0, dtype=np.float64) - lo) / step, rtol=1e-9)
    wide = unit(rng.standard_normal((400, 32)))  # negative values: below every lo_j
    wide_keys = [("W", f"w{i:03d}") for i in range(400)]
    cache.apply(Changes(seq=2, upserted=wide_keys, vectors=wide, deleted=[]))
    queries = unit(rng.standard_normal((8, 32)))
    assert_bounds(cache, queries)
    fast.scanner.sync()
    assert fast.table.n_at_fit == 3000 and fast.table.max_err_norm > 10 * before
    more = distribution("offset", rng, 4000, 32)
    more_keys = [("M", f"m{i:04d}") for i in range(4000)]
    cache.apply(Changes(seq=3, upserted=more_keys, vectors=more, deleted=[]))
    fast.scanner.sync()  # 7400 rows > 2 x 3000: refitted
    assert fast.table.n_at_fit == 7400
    all_rows = cache.vectors[: cache.n_rows]
    new_lo, new_step, new_centre = fast.table.fit
    np.testing.assert_array_equal(new_lo, all_rows.min(0))
    mean = all_rows.mean(0, dtype=np.float64)
    np.testing.assert_allclose(new_centre, (mean - new_lo) / new_step, rtol=1e-9)
    assert_bounds(cache, queries)


@pytest.fixture(scope="module")
def real_features(cnn_catalog_dir, demo_dir, tmp_path_factory):
    """The demo photos' real ``cnn`` (d = 1280) and ``hog`` (d = 1764) vectors."""
    with lookalike.open_catalog(cnn_catalog_dir) as cat:
        cnn = np.array(cat.engine.cache.vectors[: cat.engine.cache.n_rows])
    path = tmp_path_factory.mktemp("hog") / "cat"
    with lookalike.open_catalog(path, extractor="hog") as cat:
        assert cat.index([demo_dir / "photos"]).added == 84
        hog = np.array(cat.engine.cache.vectors[: cat.engine.cache.n_rows])
    return {"cnn": cnn, "hog": hog}


@pytest.mark.parametrize("name", ["cnn", "hog"])
def test_margin_bounds_real_features(real_features, name):
    x = real_features[name]
    assert (x >= 0).all()  # ReLU + pooling, histograms: one-sided
    rng = np.random.default_rng(2)
    # the 84 real vectors, and 8400 made from them (each plus small noise, kept >= 0)
    noise = 0.2 * x.std(0) * rng.standard_normal((8400, x.shape[1]))
    tiled = unit(np.maximum(x[rng.integers(0, len(x), 8400)] + noise, 0))
    for data in (x, tiled):
        prepared = assert_bounds(make_cache(data), x[rng.choice(len(x), 6, replace=False)])
        assert max(p.margin for p in prepared) < 0.01


def test_every_instruction_set_computes_the_same_scores():
    """The integer sums are exact on every path (AVX2's int16 step cannot saturate with
    query codes in [-64, 64], even against codes of 255), and the score formula is the same,
    so dense scan scores are bit for bit equal."""
    rng = np.random.default_rng(8)
    x = distribution("nonneg", rng, 3000, 40)
    x[:100] = unit(np.ones((100, 40)))  # near the top of every range: codes of 255
    cache = make_cache(x)
    fast = FastEngine(cache, codes="int8")
    fast.scanner.sync()
    queries = np.concatenate([distribution("random", rng, 4, 40), unit(-np.ones((1, 40)))])
    for q in queries:
        prepared = fast.scanner.prepare(q)
        assert np.abs(prepared.buf).max() == 64
        dense = {}
        for name in ISAS:
            kernels.set_isa(name)
            dense[name] = fast.scanner.dense(prepared, RowFilter()).copy()
        kernels.set_isa("auto")
        for name in ISAS:
            np.testing.assert_array_equal(dense[name], dense["generic"])


@pytest.mark.parametrize(
    ("dist", "nq", "d"),
    [
        ("nonneg", 21, 48),
        ("offset", 21, 48),
        ("nonneg", 12, 48),
        ("offset", 9, 48),
        ("nonneg", 3, 48),
        ("nonneg", 21, 100),
        ("offset", 3, 100),
    ],
)
def test_batches_and_single_queries_are_exact_on_crowded_scores(dist, nq, d, isa):
    """A batch scores coarse codes first and adds the fine part only where a block can still
    matter: its answers must equal the single queries' and the reference engine's, with
    filters, thresholds and every shape of a last partial group of queries (the AVX-512 kernel
    scores one in chunks of 8 and 4 queries: 21 = 16 + 5 (8, padded), 12 = 8 + 4, 9 = 8 + 1,
    3 (4, padded)). At d = 100 the AMX path runs (it needs d >= 64): the second 64-dim tile of
    a block (dims 64-99 padded to 128) reads 7 dim groups of the next block against zero query
    bytes, and the table's last block (40,003 rows: 2,501 blocks, the last one partial) goes
    through the VNNI path."""
    rng = np.random.default_rng(5)
    x = distribution(dist, rng, 40_003, d)  # 40k rows: the kernels run on every core
    cache = make_cache(x)
    fast, exact = FastEngine(cache, codes="int8"), NumpyEngine(cache)
    queries = distribution(dist, rng, nq, d)
    mask = rng.random(len(cache.listings)) < 0.6
    top = float(np.sort(x @ queries[0])[-30])
    for spec in (
        SearchSpec(k=10),
        SearchSpec(k=25, listing_mask=mask),
        SearchSpec(k=10, threshold=top),
        SearchSpec(k=5, group_by="listing", agg="mean"),
    ):
        got = fast.search(queries, spec)
        for q, g in zip(queries, got, strict=True):
            # the reference sums in another order: scores 1e-7 apart may swap places, so its
            # answer is matched score for score, and the single query row for row
            want = exact.search(q, spec)[0]
            assert len(g.rows) == len(want.rows), spec
            np.testing.assert_allclose(g.scores, want.scores, rtol=0, atol=1e-6)
            single = fast.search(q, spec)[0]
            assert single.rows.tolist() == g.rows.tolist(), spec
            if spec.listing_mask is None and spec.group_by is None and len(g.rows) == spec.k:
                # no row missed: every row clearly above the k-th score (float64) is in
                truth = cache.vectors[: cache.n_rows].astype(np.float64) @ q.astype(np.float64)
                above = np.flatnonzero(truth > float(g.scores[-1]) + 1e-6)
                assert set(above.tolist()) <= set(g.rows.tolist()), spec


def test_rows_rescored_stay_near_rerank_times_k_on_non_negative_vectors():
    """On abs-Gaussian vectors the former symmetric codes re-scored 125 rows per query here
    (3x rerank x k; 845 at d = 512 and 200k rows); the tight codes stay close to rerank x k
    (44 here), in single queries and in batches."""
    rng = np.random.default_rng(3)
    x = distribution("nonneg", rng, 100_000, 128)
    cache = make_cache(x)
    fast = FastEngine(cache, codes="int8", rerank=4)
    queries = distribution("nonneg", rng, 16, 128)
    spec = SearchSpec(k=10)
    for q in queries:
        fast.search(q, spec)
    assert fast.queries == 16
    single = fast.rescored / fast.queries
    assert 40 <= single <= 60
    fast.search(queries, spec)
    assert (fast.rescored / fast.queries) <= 60
    assert fast.widened == 0
