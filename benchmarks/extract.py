"""Extraction throughput: images/s of ``index`` end to end (read + decode + model + store).

Writes an enlarged demo collection (real photos, seeded variants) to a temp folder, then
indexes it into fresh catalogs with each extractor and several worker counts, and measures the
pieces on their own: decode + preprocess in one process, and the cnn model alone through ONNX
Runtime and through eager torch (the peer that ONNX Runtime replaces), on the same batch.

    python benchmarks/extract.py                 # 14 listings x 40 images = 560 images
    python benchmarks/extract.py --per-listing 10 --json

Prints a table (or one JSON object per row with ``--json``). Not a test: figures vary with the
machine; the README quotes a run on the build machine.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

import lookalike
from lookalike.demo import write_demo
from lookalike.extract import get_extractor
from lookalike.images import iter_folder, load_image


def index_rate(photos: Path, extractor: str, workers: int, batch_size: int) -> dict:
    with (
        tempfile.TemporaryDirectory() as tmp,
        lookalike.open_catalog(Path(tmp) / "cat", extractor=extractor) as cat,
    ):
        cat.extractor.embed_images([])  # load the model outside the timing
        if extractor == "cnn":
            cat.extractor.embed(np.zeros((1, 224, 224, 3), np.uint8))
        t0 = time.perf_counter()
        report = cat.index([photos], workers=workers, batch_size=batch_size)
        seconds = time.perf_counter() - t0
        assert not report.failed and report.added > 0
        return {
            "name": f"index {extractor} workers={workers}",
            "images": report.added,
            "seconds": round(seconds, 3),
            "images_per_s": round(report.added / seconds, 1),
        }


def decode_rate(photos: Path, extractor: str) -> dict:
    ext = get_extractor(extractor)
    sources = list(iter_folder(photos))
    t0 = time.perf_counter()
    for s in sources:
        ext.preprocess(load_image(s.location, draft_size=ext.draft_size).image)
    seconds = time.perf_counter() - t0
    return {
        "name": f"decode+preprocess {extractor} (1 process)",
        "images": len(sources),
        "seconds": round(seconds, 3),
        "images_per_s": round(len(sources) / seconds, 1),
    }


def model_rate(device: str, batch: np.ndarray, repeats: int) -> dict:
    ext = get_extractor("cnn", device=device)
    ext.embed(batch[:2])  # load + warm up
    t0 = time.perf_counter()
    for _ in range(repeats):
        ext.embed(batch)
    seconds = time.perf_counter() - t0
    n = len(batch) * repeats
    return {
        "name": f"cnn model only, {ext.device}, batch {len(batch)}",
        "images": n,
        "seconds": round(seconds, 3),
        "images_per_s": round(n / seconds, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-listing", type=int, default=40, help="images per demo listing")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--json", action="store_true", help="one JSON object per row")
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_demo(tmp, images_per_listing=args.per_listing, queries_per_listing=0, seed=1)
        photos = Path(tmp) / "photos"
        cores = os.cpu_count() or 1
        for workers in sorted({cores, 1, 0}, reverse=True):
            rows.append(index_rate(photos, "cnn", workers, args.batch_size))
        rows.append(index_rate(photos, "hog", cores, args.batch_size))
        rows.append(index_rate(photos, "colorhist", cores, args.batch_size))
        rows.append(decode_rate(photos, "cnn"))
        cnn = get_extractor("cnn", device="cpu")
        batch = np.stack(
            [
                cnn.preprocess(load_image(s.location, draft_size=224).image)
                for s in list(iter_folder(photos))[: args.batch_size]
            ]
        )
    onnx = model_rate("cpu", batch, repeats=6)
    eager = model_rate("torch-cpu", batch, repeats=1)
    onnx["vs_torch_eager"] = round(onnx["images_per_s"] / eager["images_per_s"], 1)
    rows += [onnx, eager]

    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print(f"{'what':<52} {'images':>7} {'seconds':>8} {'images/s':>9}")
    for row in rows:
        extra = f"  ({row['vs_torch_eager']}x torch eager)" if "vs_torch_eager" in row else ""
        print(
            f"{row['name']:<52} {row['images']:>7} {row['seconds']:>8.2f} "
            f"{row['images_per_s']:>9.1f}{extra}"
        )


if __name__ == "__main__":
    main()
