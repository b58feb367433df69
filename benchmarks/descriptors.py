"""Which descriptor: cnn configurations and the classic baselines compared on public sets.

Writes the public evaluation sets (:mod:`lookalike.evalsets`: near-duplicates of packaged
photos under the calibration's six edits, Fashion-MNIST, Tux Paint's photographic stamps, the
demo), extracts every image with each configuration (features cached per configuration and
set under ``--cache``, so a rerun only extracts what is new), and prints one row per
configuration:

* per set, **mAP** (full ranking, :func:`lookalike.evaluate.average_precision`): a category set
  image by image (each image queries all the others; relevant: its class), the demo's held-out
  queries against its indexed photos (relevant: the query's listing), and each near-duplicate
  copy against the originals (relevant: its own original; one relevant image, so AP = 1/rank);
* near-duplicates: the **recall at precision 0.99 and 0.95** (the lowest threshold that keeps
  the precision, :func:`lookalike.analytics.calibrate.choose_threshold`, over every
  copy-vs-original score: each copy against its own original is a positive, against every other
  original a negative) and that threshold;
* **images/s** end to end (decode + preprocess + model, one process, on ``--speed`` edited
  copies of mixed sizes), timed in alternating rounds with today's default on the same images,
  and the ratio to it (the machine is shared: read the ratio);
* **MB**: the weights package installed for the model plus the ONNX file the configuration
  builds (the cached graphs).

    python benchmarks/descriptors.py                           # every configuration
    python benchmarks/descriptors.py --configs crop-avg,pad-gem --sets fashion-mnist
    python benchmarks/descriptors.py --json

Configurations are ``cnn`` extractor options (:class:`lookalike.extract.cnn_options.CnnOptions`);
each row shows the version string a catalog would store. Not a test.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from lookalike import evalsets
from lookalike.analytics.calibrate import choose_threshold
from lookalike.evaluate import average_precision
from lookalike.extract import get_extractor
from lookalike.extract.cnn import cache_dir, onnx_path, weights_path
from lookalike.images import load_image

#: name -> (extractor, options). ``crop-avg`` is the cnn default before this comparison.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "crop-avg": ("cnn", {"fit": "crop", "pooling": "avg"}),
    "crop-gem": ("cnn", {"fit": "crop", "pooling": "gem"}),
    "squash-avg": ("cnn", {"fit": "squash", "pooling": "avg"}),
    "squash-gem": ("cnn", {"fit": "squash", "pooling": "gem"}),
    "pad-avg": ("cnn", {"fit": "pad", "pooling": "avg"}),
    "pad-gem": ("cnn", {"fit": "pad", "pooling": "gem"}),
    "lite1-pad-gem": ("cnn", {"model": "efficientnet-lite1", "fit": "pad", "pooling": "gem"}),
    "lite2-pad-gem": ("cnn", {"model": "efficientnet-lite2", "fit": "pad", "pooling": "gem"}),
    "pad-gem-flip": ("cnn", {"fit": "pad", "pooling": "gem", "flip": True}),
    "pad-gem-ms": ("cnn", {"fit": "pad", "pooling": "gem", "scales": (1.0, 0.707)}),
    "pad-gem-int8": ("cnn", {"fit": "pad", "pooling": "gem", "int8": True}),  # 7-bit weights
    "pad-gem-int8w8": ("cnn", {"fit": "pad", "pooling": "gem", "int8": True, "int8_bits": 8}),
    "colorhist": ("colorhist", {}),
    "hog": ("hog", {}),
}
BASELINE = "crop-avg"
BATCH = 32


def make_extractor(name: str) -> Any:
    """The extractor of configuration ``name`` (cnn on the CPU through ONNX Runtime)."""
    kind, options = CONFIGS[name]
    if kind == "cnn":
        return get_extractor("cnn", device="cpu", **options)
    return get_extractor(kind)


def extract(ext: Any, paths: list[str]) -> np.ndarray:
    """``(n, d) float32`` vectors of image files, decoded as ``lookalike index`` does."""
    out = []
    for start in range(0, len(paths), BATCH):
        chunk = paths[start : start + BATCH]
        arrays = [ext.preprocess(load_image(p, draft_size=ext.draft_size).image) for p in chunk]
        out.append(ext.embed(np.stack(arrays)))
    return np.concatenate(out) if out else np.zeros((0, ext.dim), np.float32)


def cached_features(ext: Any, paths: list[str], cache: Path, set_name: str) -> np.ndarray:
    """:func:`extract`, cached under ``cache`` by model tag, set and the files' contents."""
    h = hashlib.sha256()
    for p in paths:
        h.update(hashlib.sha256(Path(p).read_bytes()).digest())
    key = h.hexdigest()[:16]
    tag = ext.info.tag.replace("/", "_").replace("@", "_")
    path = cache / tag / f"{set_name}-{key}.npy"
    if path.exists():
        return np.load(path)
    vectors = extract(ext, paths)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors


def ranking_map(scores: np.ndarray, relevant: np.ndarray) -> float:
    """Mean AP of rows of ``scores`` ``(q, n)`` with ``relevant`` ``(q, n) bool`` (full
    ranking; ties broken by column order)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return float(np.mean([average_precision(relevant[i, order[i]]) for i in range(len(scores))]))


def evaluate_set(s: evalsets.EvalSet, gallery: np.ndarray, queries: np.ndarray) -> dict:
    """The set's figures (module docstring) from its vectors."""
    labels = np.array([label for _, label in s.images])
    if s.kind == "category":
        scores = gallery @ gallery.T
        np.fill_diagonal(scores, -np.inf)  # an image does not find itself
        relevant = labels[:, None] == labels[None, :]
        np.fill_diagonal(relevant, False)
        return {"mAP": ranking_map(scores, relevant)}
    qlabels = np.array([label for _, label in s.queries])
    scores = queries @ gallery.T
    relevant = qlabels[:, None] == labels[None, :]
    out = {"mAP": ranking_map(scores, relevant)}
    if s.kind == "near-dup":
        pos, neg = scores[relevant], scores[~relevant]
        for target in (0.99, 0.95):
            t, _, recall = choose_threshold(pos, neg, target)
            out[f"recall@P{target:g}"] = recall
            out[f"threshold@P{target:g}"] = t
    return out


def speed(names: list[str], paths: list[str], rounds: int) -> dict[str, tuple[float, float]]:
    """images/s of each configuration and its ratio to :data:`BASELINE`, timed in rounds that
    alternate with the baseline on the same files (models loaded before the timing)."""
    exts = {n: make_extractor(n) for n in {*names, BASELINE}}
    for ext in exts.values():
        extract(ext, paths[:2])

    def rate(ext: Any) -> float:
        t0 = time.perf_counter()
        extract(ext, paths)
        return len(paths) / (time.perf_counter() - t0)

    out = {}
    for name in names:
        pairs = [(rate(exts[name]), rate(exts[BASELINE])) for _ in range(rounds)]
        ratios = [a / b for a, b in pairs]
        out[name] = (float(np.median([a for a, _ in pairs])), float(np.median(ratios)))
    return out


def install_mb(name: str) -> float:
    """Weights package + the configuration's ONNX files, MB (0 for the classic extractors)."""
    if CONFIGS[name][0] != "cnn":
        return 0.0
    ext = make_extractor(name)
    package = weights_path(ext.options.model).parent.parent
    total = sum(p.stat().st_size for p in package.rglob("*") if p.is_file())
    for spec in ext.options.graphs():
        path = onnx_path(spec)
        total += path.stat().st_size if path.exists() else 0
    return total / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--sets", default=",".join(evalsets.BUILDERS))
    ap.add_argument("--sets-dir", type=Path, help="where the sets are written (default: temp)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "lookalike-desc")
    ap.add_argument("--speed", type=int, default=48, help="images timed per round (0: none)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # ONNX Runtime's quantization tool warns
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown configurations: {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.sets_dir or Path(tmp)
        t0 = time.perf_counter()
        sets = evalsets.build(folder, args.sets.split(","))
        for missing in set(args.sets.split(",")) - set(sets):
            print(f"# skipped {missing}: {evalsets.INSTALL_HINTS.get(missing, 'not available')}")
        print(f"# sets written in {time.perf_counter() - t0:.0f} s (ONNX cache: {cache_dir()}):")
        for s in sets.values():
            print(f"#   {s.name}: {len(s.images)} images, {len(s.queries)} queries; {s.source}")
        rows = []
        for name in names:
            ext = make_extractor(name)
            row: dict[str, Any] = {"config": name, "model": ext.info.tag}
            t1 = time.perf_counter()
            for s in sets.values():
                gallery = cached_features(ext, [p for p, _ in s.images], args.cache, s.name)
                queries = cached_features(ext, [p for p, _ in s.queries], args.cache, s.name + "-q")
                for key, value in evaluate_set(s, gallery, queries).items():
                    row[f"{s.name} {key}"] = round(value, 4)
            row["extract_s"] = round(time.perf_counter() - t1, 1)
            row["MB"] = round(install_mb(name), 1)
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
        if args.speed and "near-duplicates" in sets:
            timed = [p for p, _ in sets["near-duplicates"].queries][::7][: args.speed]
            rates = speed(names, timed, args.rounds)
            for row in rows:
                rate, ratio = rates[row["config"]]
                row["images_per_s"], row["x_default"] = round(rate, 1), round(ratio, 2)
                if args.json:
                    print(
                        json.dumps(
                            {
                                "config": row["config"],
                                "images_per_s": row["images_per_s"],
                                "x_default": row["x_default"],
                            }
                        )
                    )
    if not args.json:
        print_table(rows)


def print_table(rows: list[dict[str, Any]]) -> None:
    """The rows as a Markdown table (the README's "Evaluation")."""
    metrics = [k for k in rows[0] if k not in ("config", "model", "extract_s")]
    print("| config | version | " + " | ".join(metrics) + " |")
    print("|---|---|" + "---|" * len(metrics))
    for row in rows:
        cells = [str(row.get(k, "")) for k in metrics]
        print(f"| {row['config']} | `{row['model']}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
