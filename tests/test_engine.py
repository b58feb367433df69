"""Every exact engine against the brute-force oracle: top-k, threshold, grouping, filters,
deletes; the compiled and GPU engines against the numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import oracle
from lookalike.engine import NumpyEngine, SearchEngine, VectorCache, check_spec
from lookalike.engine import _kernels as kernels
from lookalike.engine.fast import FastEngine
from lookalike.engine.gpu import TorchEngine
from lookalike.engine.refine import (
    MAX_CANDIDATES_BATCH,
    MIN_CANDIDATES_BATCH,
    MIN_CANDIDATES_LEARNED,
    NEEDED_WINDOW,
    CandidateFloor,
    RowFilter,
)
from lookalike.errors import QueryError
from lookalike.types import Changes, SearchSpec

ENGINES = ["numpy", "int8", "float16", "float32", "int8-generic", "float16-generic", "torch"]


@pytest.fixture(params=ENGINES)
def engine_kind(request):
    """Every engine and code kind, the compiled kernels with and without AVX-512."""
    kernels.set_isa("generic" if request.param.endswith("-generic") else "auto")
    yield request.param.removesuffix("-generic")
    kernels.set_isa("auto")


def make_engine(cache, kind) -> SearchEngine:
    if kind == "numpy":
        return NumpyEngine(cache)
    if kind == "torch":  # the GPU engine, run on the CPU device so every machine tests it
        return TorchEngine(cache, device="cpu", rerank=1)
    return FastEngine(cache, codes=kind, rerank=1)


def make_cache(keys, vectors, seq=1) -> VectorCache:
    cache = VectorCache(vectors.shape[1])
    cache.apply(Changes(seq=seq, upserted=list(keys), vectors=vectors, deleted=[]))
    return cache


def random_collection(rng, n_listings=7, per=5, d=8):
    keys = [(f"L{i:02d}", f"L{i:02d}/img{j}") for i in range(n_listings) for j in range(per)]
    rng.shuffle(keys)
    return keys, oracle.quantized(rng, len(keys), d)


def run(cache, q, engine_kind, engine="numpy", **spec):
    listing_ok = spec.pop("listing_ok", None)
    mask = None
    if listing_ok is not None:
        mask = np.array([listing_ok(lid) for lid in cache.listings.ids])
    hits = make_engine(cache, engine).search(q, SearchSpec(listing_mask=mask, **spec))[0]
    pairs = zip(hits.rows, hits.scores, strict=True)
    return [(cache.keys[r][0], cache.keys[r][1], float(s)) for r, s in pairs]


def expected(cache, q, **spec):
    live = [(k, cache.vectors[r]) for k, r in cache.row_of.items()]
    return oracle.search([k for k, _ in live], np.array([v for _, v in live]), q, **spec)


@pytest.mark.parametrize("k", [1, 3, 10, 35, 100])
def test_image_topk_matches_oracle(engine_kind, k):
    rng = np.random.default_rng(k)
    keys, vectors = random_collection(rng)
    cache = make_cache(keys, vectors)
    for _ in range(5):
        q = oracle.quantized(rng, 1, 8)[0]
        assert run(cache, q, engine_kind, k=k) == expected(cache, q, k=k)


def test_k_larger_than_collection_returns_everything_in_order(engine_kind):
    rng = np.random.default_rng(1)
    keys, vectors = random_collection(rng, 3, 2)
    cache = make_cache(keys, vectors)
    q = oracle.quantized(rng, 1, 8)[0]
    hits = run(cache, q, engine_kind, k=1000)
    assert len(hits) == 6
    assert hits == expected(cache, q, k=1000)


def test_ties_are_broken_by_listing_then_image_id(engine_kind):
    keys = [("b", "b/2"), ("a", "a/9"), ("b", "b/1"), ("c", "c/0"), ("a", "a/1")]
    vectors = np.ones((5, 4), dtype=np.float32)
    cache = make_cache(keys, vectors)
    q = np.ones(4, dtype=np.float32)
    assert [h[:2] for h in run(cache, q, engine_kind, k=3)] == [
        ("a", "a/1"),
        ("a", "a/9"),
        ("b", "b/1"),
    ]
    grouped = run(cache, q, engine_kind, k=10, group_by="listing")
    assert [h[:2] for h in grouped] == [("a", "a/1"), ("b", "b/1"), ("c", "c/0")]


@pytest.mark.parametrize("agg", ["max", "mean", "sum-top-n"])
@pytest.mark.parametrize("top_n", [1, 2, 4])
def test_grouped_matches_oracle(engine_kind, agg, top_n):
    rng = np.random.default_rng(top_n)
    keys, vectors = random_collection(rng, 9, 4)
    cache = make_cache(keys, vectors)
    for _ in range(4):
        q = oracle.quantized(rng, 1, 8)[0]
        for k in (1, 4, 20):
            spec = dict(k=k, group_by="listing", agg=agg, top_n=top_n)
            assert run(cache, q, engine_kind, **spec) == expected(cache, q, **spec)


@pytest.mark.parametrize("group_by", [None, "listing"])
def test_threshold_returns_every_hit_above(engine_kind, group_by):
    rng = np.random.default_rng(7)
    keys, vectors = random_collection(rng, 8, 6)
    cache = make_cache(keys, vectors)
    q = oracle.quantized(rng, 1, 8)[0]
    for t in (-1.0, 0.0, 0.125, 0.5):
        spec = dict(k=None, threshold=t, group_by=group_by)
        got = run(cache, q, engine_kind, **spec)
        assert got == expected(cache, q, **spec)
        assert all(h[2] > t for h in got)


def test_threshold_with_k_cuts_after_threshold(engine_kind):
    rng = np.random.default_rng(8)
    keys, vectors = random_collection(rng)
    cache = make_cache(keys, vectors)
    q = oracle.quantized(rng, 1, 8)[0]
    assert run(cache, q, engine_kind, k=3, threshold=0.0) == expected(cache, q, k=3, threshold=0.0)


def test_filter_is_applied_before_ranking(engine_kind):
    rng = np.random.default_rng(9)
    keys, vectors = random_collection(rng)
    cache = make_cache(keys, vectors)
    q = oracle.quantized(rng, 1, 8)[0]

    def ok(lid):
        return int(lid[1:]) % 2 == 0

    for group_by in (None, "listing"):
        got = run(cache, q, engine_kind, k=3, group_by=group_by, listing_ok=ok)
        assert len(got) == 3 and all(ok(h[0]) for h in got)
        assert got == expected(cache, q, k=3, group_by=group_by, listing_ok=ok)


def test_empty_filter_result_gives_no_hits(engine_kind):
    rng = np.random.default_rng(10)
    keys, vectors = random_collection(rng)
    cache = make_cache(keys, vectors)
    q = oracle.quantized(rng, 1, 8)[0]
    assert run(cache, q, engine_kind, k=5, listing_ok=lambda lid: False) == []
    assert run(cache, q, engine_kind, k=5, group_by="listing", listing_ok=lambda lid: False) == []


def test_deletes_and_replacements_are_applied_incrementally(engine_kind):
    rng = np.random.default_rng(11)
    keys, vectors = random_collection(rng, 4, 4, d=8)
    cache = make_cache(keys, vectors)
    gone = keys[:3]
    replaced = keys[3]
    new_vec = oracle.quantized(rng, 1, 8)
    cache.apply(Changes(seq=2, upserted=[replaced], vectors=new_vec, deleted=gone))
    assert cache.n_alive == len(keys) - 3
    q = new_vec[0]
    got = run(cache, q, engine_kind, k=100)
    assert not {h[:2] for h in got} & set(gone)
    assert got == expected(cache, q, k=100)
    assert cache.vectors[cache.row_of[replaced]].tolist() == new_vec[0].tolist()


def test_all_rows_deleted_gives_no_hits(engine_kind):
    rng = np.random.default_rng(12)
    keys, vectors = random_collection(rng, 2, 2)
    cache = make_cache(keys, vectors)
    cache.apply(Changes(seq=2, upserted=[], vectors=np.zeros((0, 8), np.float32), deleted=keys))
    q = oracle.quantized(rng, 1, 8)[0]
    assert run(cache, q, engine_kind, k=5) == []
    assert run(cache, q, engine_kind, k=5, group_by="listing") == []


def test_compaction_keeps_answers_and_reclusters_by_listing(engine_kind):
    rng = np.random.default_rng(13)
    keys, vectors = random_collection(rng, 6, 5)
    cache = make_cache(keys, vectors)
    q = oracle.quantized(rng, 1, 8)[0]
    cache.apply(
        Changes(
            seq=2, upserted=[], vectors=np.zeros((0, 8), np.float32), deleted=keys[: len(keys) // 2]
        )
    )  # > 25% dead -> compacts
    assert cache.n_rows == cache.n_alive
    lids = [cache.keys[r][0] for r in range(cache.n_rows)]
    assert lids == sorted(lids)
    assert run(cache, q, engine_kind, k=50, group_by="listing") == expected(
        cache, q, k=50, group_by="listing"
    )


def test_batch_of_queries_equals_single_queries(engine_kind):
    rng = np.random.default_rng(14)
    keys, vectors = random_collection(rng)
    cache = make_cache(keys, vectors)
    queries = oracle.quantized(rng, 19, 8)  # a full group of 16 queries and a partial one
    engine = make_engine(cache, engine_kind)
    reference = NumpyEngine(cache)
    for spec in (
        SearchSpec(k=7),
        SearchSpec(k=3, listing_mask=np.arange(7) % 2 == 0),
        SearchSpec(k=5, threshold=0.25),
    ):
        batch = engine.search(queries, spec)
        for q, hits in zip(queries, batch, strict=True):
            single = reference.search(q, spec)[0]
            assert hits.rows.tolist() == single.rows.tolist()
            assert hits.scores.tolist() == single.scores.tolist()


@pytest.mark.parametrize("bad", [np.array([np.nan] * 8), np.array([np.inf] + [0.0] * 7)])
def test_nan_or_inf_query_is_a_clear_error(bad):
    cache = make_cache([("a", "a/1")], np.ones((1, 8), np.float32))
    with pytest.raises(QueryError, match="NaN or infinity"):
        NumpyEngine(cache).search(bad, SearchSpec())


def test_wrong_dimension_query_is_a_clear_error():
    cache = make_cache([("a", "a/1")], np.ones((1, 8), np.float32))
    with pytest.raises(QueryError, match="d=5"):
        NumpyEngine(cache).search(np.ones(5, np.float32), SearchSpec())


@pytest.mark.parametrize(
    "spec",
    [
        dict(k=0),
        dict(k=None),
        dict(agg="median"),
        dict(group_by="image"),
        dict(top_n=0),
        dict(threshold=float("nan")),
    ],
)
def test_bad_specs_are_refused(spec):
    with pytest.raises(QueryError):
        check_spec(SearchSpec(**spec))


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    n_listings=st.integers(1, 6),
    per=st.integers(1, 5),
    k=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
    agg=st.sampled_from(["max", "mean", "sum-top-n"]),
    top_n=st.integers(1, 4),
    grouped=st.booleans(),
    levels=st.integers(1, 3),
)
def test_property_search_equals_oracle(
    engine_kind, n_listings, per, k, seed, agg, top_n, grouped, levels
):
    """Few levels -> many exact ties: ordering and selection must still match the oracle."""
    rng = np.random.default_rng(seed)
    keys = [(f"L{i}", f"L{i}/{j}") for i in range(n_listings) for j in range(per)]
    rng.shuffle(keys)
    vectors = oracle.quantized(rng, len(keys), 4, levels)
    cache = make_cache(keys, vectors)
    q = oracle.quantized(rng, 1, 4, levels)[0]
    spec = dict(k=k, group_by="listing" if grouped else None, agg=agg, top_n=top_n)
    assert run(cache, q, engine_kind, **spec) == expected(cache, q, **spec)


@pytest.mark.parametrize("codes", ["int8", "float16", "float32", "torch"])
@pytest.mark.parametrize("n", [5000, 40_000])  # 40k rows: the kernels run on every core
def test_fast_engine_equals_exact_engine_at_scale(codes, n):
    """Many more rows than candidates: the exactness proof must widen when ties or near-ties
    straddle the candidate boundary, and the answers must still equal the reference."""
    rng = np.random.default_rng(n)
    n_listings = n // 10
    keys = [(f"L{i % n_listings:05d}", f"img{i:06d}") for i in range(n)]
    vectors = oracle.quantized(rng, n, 32, levels=1)
    prototypes = oracle.quantized(rng, 8, 32, levels=1)
    vectors[::2] = prototypes[rng.integers(0, 8, n // 2)]  # hundreds of exact duplicates: ties
    cache = make_cache(keys, vectors)
    fast, exact = make_engine(cache, codes), NumpyEngine(cache)
    mask = rng.random(n_listings) < 0.7
    specs = [
        SearchSpec(k=10),
        SearchSpec(k=25, listing_mask=mask),
        SearchSpec(k=None, threshold=0.75),
        SearchSpec(k=10, threshold=0.5),  # batch path with per-query candidate floors
        SearchSpec(k=10, threshold=1.5),  # fewer than k hits pass
        SearchSpec(k=10, group_by="listing"),
        SearchSpec(k=10, group_by="listing", agg="mean", listing_mask=mask),
        SearchSpec(k=10, group_by="listing", agg="sum-top-n", top_n=2),
        SearchSpec(k=None, threshold=1.5, group_by="listing", agg="sum-top-n", top_n=3),
    ]
    queries = oracle.quantized(rng, 4, 32, levels=1)
    for spec in specs:
        for q, got in zip(queries, fast.search(queries, spec), strict=True):
            want = exact.search(q, spec)[0]
            assert got.rows.tolist() == want.rows.tolist(), spec
            assert got.scores.tolist() == want.scores.tolist(), spec
            assert got.counts.tolist() == want.counts.tolist(), spec


@pytest.mark.parametrize("codes", ["int8", "float16", "float32", "torch"])
@pytest.mark.parametrize("grouped", [False, True])
def test_proof_widens_when_ties_straddle_the_candidates(codes, grouped):
    """1000 copies of the query vector tie for first place: far more than the candidates the
    engine re-scores first, so the exactness check must widen, and the tie-break must hold."""
    rng = np.random.default_rng(21)
    v = oracle.quantized(rng, 1, 16)[0]
    vectors = np.concatenate([np.tile(v, (1000, 1)), oracle.quantized(rng, 3000, 16)])
    keys = [(f"L{(i * 7919) % 1500:04d}", f"img{i:05d}") for i in range(4000)]
    cache = make_cache(keys, vectors)
    fast = make_engine(cache, codes)
    spec = SearchSpec(k=10, group_by="listing" if grouped else None)
    got = fast.search(v, spec)[0]
    want = NumpyEngine(cache).search(v, spec)[0]
    assert got.rows.tolist() == want.rows.tolist()
    assert len(set(got.scores.tolist())) == 1  # all tied
    assert fast.widened == 1


def test_candidate_floor_is_learned_from_the_needed_counts():
    floor = CandidateFloor()
    for _ in range(NEEDED_WINDOW // 4 - 1):
        floor.record(50)
    assert floor.value() == MIN_CANDIDATES_BATCH  # too few queries seen yet
    floor.record(50)
    assert floor.value() == MIN_CANDIDATES_LEARNED
    floor.record(700)  # 1.5 x 700 = 1050, rounded up to a multiple of 128
    assert floor.value() == 1152
    floor.record(10**6)
    assert floor.value() == MAX_CANDIDATES_BATCH
    for _ in range(NEEDED_WINDOW - 1):  # the large counts leave the window...
        floor.record(50)
    assert floor.value() == MAX_CANDIDATES_BATCH
    floor.record(50)  # ...one by one
    assert floor.value() == MIN_CANDIDATES_LEARNED


def test_batches_keep_as_many_candidates_as_their_queries_need():
    """Ordinary queries need few candidates, so batches learn to keep few (cheaper reservoirs);
    a query with 700 tied rows then needs more than that: it widens, its answer stays exact,
    and the floor rises so that the next batch with it does not widen."""
    rng = np.random.default_rng(8)
    n, d = 300_000, 16  # n / 256 > MIN_CANDIDATES_BATCH: the learned floor is what counts
    v = np.eye(d, dtype=np.float32)[0]  # only the tied rows have a first dimension
    others = oracle.quantized(rng, n - 700, d)
    others[:, 0] = 0
    vectors = np.concatenate([np.tile(v, (700, 1)), others])
    keys = [(f"L{i // 3:06d}", f"img{i:06d}") for i in range(n)]
    cache = make_cache(keys, vectors)
    fast, exact = FastEngine(cache, codes="int8"), NumpyEngine(cache)
    spec = SearchSpec(k=10)
    ordinary = oracle.quantized(rng, 64, d)
    ordinary[:, 0] = 0
    fast.search(ordinary, spec)
    assert fast.widened == 0
    assert fast.refiner.floor.value() == MIN_CANDIDATES_LEARNED
    batch = np.concatenate([ordinary[:7], v[None]])
    widened = []
    for _ in range(2):
        got = fast.search(batch, spec)
        for q, g in zip(batch, got, strict=True):
            w = exact.search(q, spec)[0]
            assert g.rows.tolist() == w.rows.tolist()
            assert g.scores.tolist() == w.scores.tolist()
        widened.append(fast.widened)
        assert fast.refiner.floor.value() >= 1.5 * 700
    assert widened[0] > 0  # the first batch widened (its dense re-run counts too)...
    assert widened[1] == widened[0]  # ...the second did not


@pytest.mark.parametrize("codes", ["int8", "float16"])
def test_real_valued_vectors_give_the_exact_top_k(codes):
    rng = np.random.default_rng(3)
    n, d = 20_000, 64
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    keys = [(f"L{i // 4}", f"{i}") for i in range(n)]
    cache = make_cache(keys, x)
    fast, exact = FastEngine(cache, codes=codes), NumpyEngine(cache)
    queries = rng.standard_normal((12, d)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    got = fast.search(queries, SearchSpec(k=10))
    for q, g in zip(queries, got, strict=True):
        w = exact.search(q, SearchSpec(k=10))[0]
        assert g.rows.tolist() == w.rows.tolist()
        np.testing.assert_allclose(g.scores, w.scores, rtol=0, atol=1e-6)


def test_codes_follow_appends_deletes_and_compaction():
    rng = np.random.default_rng(5)
    keys, vectors = random_collection(rng, 20, 10, d=8)
    cache = make_cache(keys[:100], vectors[:100])
    fast = FastEngine(cache, codes="int8", rerank=1)
    q = oracle.quantized(rng, 1, 8)[0]
    spec = SearchSpec(k=15)
    assert (
        fast.search(q, spec)[0].rows.tolist() == NumpyEngine(cache).search(q, spec)[0].rows.tolist()
    )
    cache.apply(Changes(seq=2, upserted=keys[100:], vectors=vectors[100:], deleted=keys[:10]))
    for _ in range(2):
        assert (
            fast.search(q, spec)[0].rows.tolist()
            == NumpyEngine(cache).search(q, spec)[0].rows.tolist()
        )
        cache.apply(
            Changes(seq=3, upserted=[], vectors=np.zeros((0, 8), np.float32), deleted=keys[10:120])
        )  # compacts: rows renumbered, codes rebuilt
    assert cache.n_rows == cache.n_alive == 80


def test_margin_bounds_the_int8_error():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3000, 48)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cache = make_cache([("L", str(i)) for i in range(3000)], x)
    fast = FastEngine(cache, codes="int8")
    fast.table.sync(cache)
    for _ in range(20):
        q = rng.standard_normal(48).astype(np.float32)
        q /= np.linalg.norm(q)
        prepared = fast.scanner.prepare(q)
        approx = fast.scanner.dense(prepared, RowFilter())
        err = np.abs(approx - x @ q).max()
        assert err <= prepared.margin
        assert prepared.margin < 0.05  # and the bound is tight enough to be useful


@pytest.mark.parametrize("kind", ["numpy", "int8", "float16", "float32", "torch"])
def test_engines_implement_the_protocol(kind):
    cache = make_cache([("a", "a/1")], np.ones((1, 8), np.float32))
    engine = make_engine(cache, kind)
    assert isinstance(engine, SearchEngine)
    assert engine.exact and engine.cache is cache
    assert engine.search(np.ones(8, np.float32), SearchSpec(k=1))[0].rows.tolist() == [0]
    assert engine.code_kind == ("float32" if kind in ("numpy", "torch") else kind)
    assert engine.nbytes() >= 0
    assert (engine.nbytes() == 0) == (kind in ("numpy", "float32"))


def test_kernel_constants_are_read_from_the_extension():
    from lookalike.engine import codes, refine

    assert codes.BLOCK == kernels.BLOCK == 16
    assert codes.KINDS == {"float32": 0, "float16": 1, "int8": 2}
    assert set(refine.KERNEL_AGG) == {"max", "mean", "sum-top-n"}
    assert kernels.QUERY_BLOCK == 16
