"""Recognition and analytics on real demo features and on random vectors against references."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lookalike
from lookalike.analytics import (
    default_k,
    exact_duplicates,
    isolation_outliers,
    kmeans,
    knn_outliers,
    near_duplicates,
    project,
    render_map_png,
)
from lookalike.evaluate import query_set
from lookalike.recognize import labels_from, train
from lookalike.types import ModelInfo

LOOKALIKE = str(Path(sys.executable).with_name("lookalike"))


@pytest.fixture
def demo_cat(cnn_catalog_copy):
    with lookalike.open_catalog(cnn_catalog_copy) as cat:
        yield cat


# ------------------------------------------------------------------ recognition


@pytest.mark.parametrize("model", ["logreg", "mlp"])
def test_classifier_recognises_held_out_photos(demo_cat, demo_dir, model):
    labels = labels_from(demo_cat, "listing")
    _, report = train(demo_cat, labels, model=model, grid=(model == "logreg"))
    assert report.n_test >= 14 and report.accuracy >= 0.9
    queries = query_set(demo_dir / "queries")
    preds = demo_cat.predict([q for q, _ in queries], k=3)
    accuracy = np.mean([top[0][0] == truth for top, (_, truth) in zip(preds, queries, strict=True)])
    print(f"{model}: held-out report accuracy {report.accuracy:.3f}, query accuracy {accuracy:.3f}")
    assert accuracy >= 0.9  # chance is 1/14
    assert all(len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1] for top in preds)
    assert len(report.confusion) == 14
    assert sum(map(sum, report.confusion)) == report.n_test


def test_labels_from_parent_and_csv(demo_cat, tmp_path):
    parent = labels_from(demo_cat, "parent")
    assert parent[("coins", "coins/coins-01.jpg")] == "coins"
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(
        "image_id,label\ncoins/coins-01.jpg,round\nmoon/moon-01.jpg,round\npage/page-01.jpg,text\n"
    )
    lab = labels_from(demo_cat, str(csv_path))
    assert lab == {
        ("coins", "coins/coins-01.jpg"): "round",
        ("moon", "moon/moon-01.jpg"): "round",
        ("page", "page/page-01.jpg"): "text",
    }
    bad = tmp_path / "bad.csv"
    bad.write_text("image_id,label\nnot/there.jpg,x\n")
    with pytest.raises(lookalike.SourceError, match=r"row 1: image 'not/there\.jpg'"):
        labels_from(demo_cat, str(bad))


def test_new_images_get_a_predicted_label_once_a_classifier_is_attached(demo_cat, demo_dir):
    train(demo_cat, labels_from(demo_cat, "listing"))
    demo_cat.add(demo_dir / "queries" / "retina" / "q-01.jpg", "incoming", "incoming/1.jpg")
    rec = demo_cat.get_image("incoming/1.jpg", "incoming")
    assert rec is not None and rec.labels is not None
    assert rec.labels["predicted"] == "retina" and 0 < rec.labels["probability"] <= 1


def test_train_and_predict_cli(cnn_catalog_copy, demo_dir):
    out = subprocess.run(
        [LOOKALIKE, "train", "-c", str(cnn_catalog_copy), "--label-from", "listing", "-f", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(out.stdout)
    assert report["accuracy"] >= 0.9 and len(report["labels"]) == 14
    q = str(demo_dir / "queries" / "flower" / "q-01.jpg")
    out = subprocess.run(
        [LOOKALIKE, "predict", q, "-c", str(cnn_catalog_copy), "-f", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    body = json.loads(out.stdout)
    assert body["predictions"][0]["label"] == "flower"
    assert list(body["predictions"][0]) == ["label", "probability"]


def test_eval_cli_reports_the_contract_and_beats_its_colorhist_baseline(cnn_catalog_copy, demo_dir):
    out = subprocess.run(
        [
            LOOKALIKE,
            "eval",
            "-c",
            str(cnn_catalog_copy),
            "--queries",
            str(demo_dir / "queries"),
            "-k",
            "6",
            "--baseline",
            "colorhist",
            "-f",
            "json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    body = json.loads(out.stdout)
    assert list(body)[:5] == ["top1", "precision_at_k", "recall_at_k", "mAP", "n_queries"]
    assert body["n_queries"] == 28 and body["k"] == 6
    assert body["top1"] == 1.0 and body["mAP"] >= 0.95
    base = body["baseline"]
    assert base["extractor"] == "colorhist" and base["n_queries"] == 28
    assert body["mAP"] > base["mAP"] + 0.1  # the same-run comparison the README quotes
    table = subprocess.run(
        [LOOKALIKE, "eval", "-c", str(cnn_catalog_copy), "--queries", str(demo_dir / "queries")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "mAP" in table and "28 queries" in table


# ------------------------------------------------------------------ clusters, map, dedup


def test_kmeans_recovers_the_photo_groups(demo_cat):
    from sklearn.metrics import adjusted_rand_score

    report = kmeans(demo_cat, k=14)
    truth = [k[0] for k in report.keys]
    ari = adjusted_rand_score(truth, report.assignments)
    print(f"k-means ARI vs listings: {ari:.3f}")
    # 84 points in 14 groups: the ARI depends on the seed. Over faiss seeds 0-9 the pad-gem3
    # cnn averages 0.67 (0.62 at seed 0), the centre-crop version it replaced 0.71 (0.82 at 0)
    assert ari >= 0.6
    assert sum(c.size for c in report.clusters) == 84
    stored = demo_cat.analysis()
    assert len(stored) == 84 and all(v["cluster"] is not None for v in stored.values())
    assert default_k(84) == 6 and report.to_dict()["k"] == 14


def test_near_duplicate_groups_equal_the_listings(demo_cat):
    groups = near_duplicates(demo_cat, threshold=0.7)
    assert sorted({k[0] for k in g}.pop() for g in groups) == sorted(
        {lid for lid, _ in demo_cat.vector_cache().keys}
    )
    assert all(len({k[0] for k in g}) == 1 and len(g) == 6 for g in groups)


def test_exact_duplicates_by_file_hash(demo_cat, demo_dir):
    copy = demo_dir / "photos" / "moon" / "moon-02.jpg"
    demo_cat.add(copy, "other", "other/same-bytes.jpg")
    assert exact_duplicates(demo_cat) == [
        [("moon", "moon/moon-02.jpg"), ("other", "other/same-bytes.jpg")]
    ]


def test_map_png_is_written_and_shows_clusters_and_outliers(demo_cat, tmp_path):
    kmeans(demo_cat, k=14)
    knn_outliers(demo_cat, k=5)
    _, xy, method = project(demo_cat)
    assert method == "pca" and xy.shape == (84, 2) and np.ptp(xy[:, 0]) > 0.1
    drawn = render_map_png(str(tmp_path / "map.png"), demo_cat)
    assert drawn == {
        "points": 84,
        "clusters": 14,
        "outliers_marked": 10,
        "png": str(tmp_path / "map.png"),
    }
    img = Image.open(tmp_path / "map.png").convert("RGB")
    colours = {c for _, c in img.getcolors(maxcolors=1 << 20)}
    assert img.size[0] >= 800 and len(colours) > 50  # a real picture, not a blank canvas
    red = np.asarray(img)[..., 0] > 200
    assert (red & (np.asarray(img)[..., 1] < 60)).sum() > 100  # the outlier circles


def test_analyze_and_dedup_cli_outputs(cnn_catalog_copy, tmp_path):
    def run(*args):
        return subprocess.run(
            [LOOKALIKE, *args, "-c", str(cnn_catalog_copy)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    clusters = json.loads(run("analyze", "clusters", "-k", "14", "-f", "json"))
    assert clusters["k"] == 14 and {"id", "size", "representative"} <= set(clusters["clusters"][0])
    groups = json.loads(run("dedup", "--threshold", "0.7", "-f", "json"))["groups"]
    assert len(groups) == 14 and all(len(g) == 6 for g in groups)
    run("dedup", "--threshold", "0.7", "--csv", str(tmp_path / "d.csv"))
    assert (tmp_path / "d.csv").read_text().count("\n") == 85
    assert "map of 84 images" in run("analyze", "map", "--png", str(tmp_path / "m.png"))
    assert (tmp_path / "m.png").stat().st_size > 20_000
    exact = json.loads(run("analyze", "outliers", "--top", "5", "-f", "json"))
    scores = [o["score"] for o in exact["outliers"]]
    assert exact["method"] == "knn-10" and len(scores) == 5 and scores == sorted(scores)[::-1]
    run("ann", "build", "--kind", "ivf")
    via_ivf = json.loads(
        run("analyze", "outliers", "--top", "5", "--index", "ivf", "--nprobe", "1", "-f", "json")
    )
    assert via_ivf["method"] == "knn-10-ivf"
    assert [o["image_id"] for o in via_ivf["outliers"]] == [
        o["image_id"] for o in exact["outliers"]
    ]  # the listed top is certified exact
    ivf_groups = json.loads(run("dedup", "--threshold", "0.7", "--index", "ivf", "-f", "json"))
    assert ivf_groups["groups"] == groups


# ------------------------------------------------------------------ references


@pytest.fixture
def vec_cat(tmp_path):
    """600 random unit vectors (d=24) with planted near-duplicate groups."""
    rng = np.random.default_rng(7)
    base = rng.standard_normal((400, 24)).astype(np.float32)
    dups = base[:100].repeat(2, axis=0) + 0.05 * rng.standard_normal((200, 24)).astype(np.float32)
    x = np.concatenate([base, dups])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cat = lookalike.open_catalog(tmp_path / "vec")
    cat.add_vectors(
        [f"L{i}" for i in range(len(x))],
        [f"{i}" for i in range(len(x))],
        x,
        model=ModelInfo("test", "1", 24),
    )
    yield cat, x
    cat.close()


def test_knn_outliers_match_a_brute_force_reference(vec_cat):
    cat, x = vec_cat
    report = knn_outliers(cat, k=5)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    top = -np.sort(-sims, axis=1)[:, :5]
    expected = 1.0 - top.mean(axis=1)
    order = [int(k[1]) for k in report.keys]
    np.testing.assert_allclose(report.scores, expected[order], atol=1e-5)


def test_knn_outliers_through_an_ivf_index(tmp_path):
    """Every cell joined with every cell gives the brute-force scores. With few cells probed,
    scores are upper bounds of the exact ones, and the top ones are certified exact: the same
    images and scores as brute force, the planted loners first."""
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((30, 32)).astype(np.float32) * 3
    x = centres[rng.integers(0, 30, 4000)] + rng.standard_normal((4000, 32)).astype(np.float32)
    x[-20:] = 3 * rng.standard_normal((20, 32)).astype(np.float32)  # loners, far from all
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    brute = 1.0 - (-np.sort(-sims, axis=1)[:, :10]).mean(axis=1)
    with lookalike.open_catalog(tmp_path / "ivf") as cat:
        cat.add_vectors(
            [f"L{i}" for i in range(len(x))],
            [str(i) for i in range(len(x))],
            x,
            model=ModelInfo("test", "1", 32),
        )
        cat.build_index("ivf")
        every = knn_outliers(cat, k=10, index="ivf", nprobe=10**6, save=False)
        few = knn_outliers(cat, k=10, index="ivf", nprobe=2, top=50)
        stored = cat.analysis()
    order = [int(k[1]) for k in every.keys]
    np.testing.assert_allclose(every.scores, brute[order], atol=1e-5)
    assert np.all(few.scores >= brute[order] - 1e-5)  # bounds: a missed neighbour, further
    assert np.mean(np.abs(few.scores - brute[order]) > 1e-4) > 0.05  # 2 cells do miss some
    want = np.argsort(-brute, kind="stable")[:50]
    got = [int(iid) for _, iid, _ in few.top(50)]
    assert set(got) == set(want.tolist())  # the certified top 50 are brute force's
    np.testing.assert_allclose([s for _, _, s in few.top(50)], brute[got], atol=1e-5)
    assert set(got[:20]) == set(range(3980, 4000))  # the loners first
    assert few.method == "knn-10-ivf"
    assert stored[few.keys[0]]["outlier_score"] == pytest.approx(float(few.scores[0]))


def test_isolation_forest_matches_scikit_learn(vec_cat):
    from sklearn.ensemble import IsolationForest

    cat, x = vec_cat
    report = isolation_outliers(cat, seed=3)
    order = [int(k[1]) for k in report.keys]
    ref = -IsolationForest(random_state=3, n_estimators=200).fit(x[order]).score_samples(x[order])
    np.testing.assert_allclose(report.scores, ref, rtol=1e-5)


def test_near_duplicates_match_connected_components(vec_cat):
    import networkx as nx

    cat, x = vec_cat
    t = 0.9
    got = {frozenset(k[1] for k in g) for g in near_duplicates(cat, threshold=t, k=4)}
    graph = nx.Graph()
    graph.add_nodes_from(range(len(x)))
    ii, jj = np.nonzero(np.triu(x @ x.T > t, k=1))
    graph.add_edges_from(zip(ii.tolist(), jj.tolist(), strict=True))
    want = {frozenset(str(i) for i in c) for c in nx.connected_components(graph) if len(c) > 1}
    assert got == want and len(want) >= 100  # k=4 forces the saturated rows to re-query


def test_dedup_of_200k_vectors_never_builds_an_n_by_n_matrix(tmp_path):
    """In a fresh process (so the peak RSS is this job's): 200k random unit vectors, d = 8; an
    n x n float32 score matrix alone would take 149 GiB."""
    code = f"""
import json, resource, time
import numpy as np
import lookalike
from lookalike.types import ModelInfo
from lookalike.analytics import near_duplicates
n, d = 200_000, 8
rng = np.random.default_rng(1)
x = rng.standard_normal((n, d)).astype(np.float32)
x /= np.linalg.norm(x, axis=1, keepdims=True)
with lookalike.open_catalog({str(tmp_path / "big")!r}) as cat:
    cat.add_vectors([f"L{{i // 8}}" for i in range(n)], [str(i) for i in range(n)], x,
                    model=ModelInfo("test", "1", d))
    cat.vector_cache()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    groups = near_duplicates(cat, threshold=0.999, k=8)
    print(json.dumps({{"groups": len(groups), "seconds": time.perf_counter() - t0,
                      "before_kib": before,
                      "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(result)
    assert result["groups"] >= 1  # random points on an 8-d sphere do have close pairs
    assert result["peak_kib"] < 2 * 2**20  # under 2 GiB for the whole process, not 149 GiB
    assert result["peak_kib"] - result["before_kib"] < 512 * 2**10  # dedup itself: < 512 MiB


def test_near_duplicates_through_an_ivf_index_find_the_exact_groups(tmp_path):
    """Clustered vectors with planted twins: dedup through IVF (few cells probed) finds the
    same groups as the exact scan, and leaves the index's own nprobe as it was."""
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((40, 32)).astype(np.float32)
    x = centres[rng.integers(0, 40, 6000)] + rng.standard_normal((6000, 32)).astype(np.float32)
    x[-150:] = x[:150] + 0.05 * rng.standard_normal((150, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    with lookalike.open_catalog(tmp_path / "ivf") as cat:
        cat.add_vectors(
            [f"L{i}" for i in range(len(x))],
            [str(i) for i in range(len(x))],
            x,
            model=ModelInfo("test", "1", 32),
        )
        cat.build_index("ivf")
        cat.delete("5", listing_id="L5")  # a dead row: in neither answer
        ann = cat.search_engine("ivf").ann
        before = ann.params.nprobe
        exact = {frozenset(g) for g in near_duplicates(cat, threshold=0.95)}
        via_ivf = {
            frozenset(g) for g in near_duplicates(cat, threshold=0.95, index="ivf", nprobe=4)
        }
        every_cell = {
            frozenset(g) for g in near_duplicates(cat, threshold=0.95, index="ivf", nprobe=10**6)
        }
        assert ann.params.nprobe == before and before > 4
    assert every_cell == exact  # joining every cell with every cell is the exact join
    assert not any(("L5", "5") in g for g in exact | via_ivf)
    assert len(exact) >= 149
    assert len(exact & via_ivf) >= 0.97 * len(exact)
    assert via_ivf <= exact  # scores are exact: IVF can miss an edge, never invent one
