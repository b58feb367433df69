"""Extraction throughput: images/s of ``index`` end to end (read + decode + model + store).

Writes an enlarged demo collection (real photos, seeded variants) to a temp folder, then
indexes it into fresh catalogs with each extractor and several worker counts, and measures the
pieces on their own: decode + preprocess in one process, and the cnn model alone through ONNX
Runtime and through eager torch (the peer that ONNX Runtime replaces), on the same batch; the
``cnn-int8`` extractor (the same network quantized to 8-bit integers) end to end and alone.

The two ways to make the cnn ONNX file are compared in the same run: the torch-free converter
(``export_onnx``: weights read with the restricted unpickler, graph built with batch norm
folded) and the former ``torch.onnx.export`` of the reference (``export_onnx_with_torch``):
seconds to make each file, images/s of each graph on the same batch (timed in alternating
rounds, so both see the same machine load), and their max abs difference from eager torch.

    python benchmarks/extract.py                 # 14 listings x 40 images = 560 images
    python benchmarks/extract.py --per-listing 10 --json
    python benchmarks/extract.py --models-only   # skip the index runs

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
from lookalike.extract import NETWORK_EXTRACTORS, get_extractor
from lookalike.images import iter_folder, load_image


def index_rate(photos: Path, extractor: str, workers: int, batch_size: int) -> dict:
    with (
        tempfile.TemporaryDirectory() as tmp,
        lookalike.open_catalog(Path(tmp) / "cat", extractor=extractor) as cat,
    ):
        cat.extractor.embed_images([])  # load the model outside the timing
        if extractor in NETWORK_EXTRACTORS:
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


def model_rate(device: str, batch: np.ndarray, repeats: int, name: str = "cnn") -> dict:
    ext = get_extractor(name, device=device)
    ext.embed(batch[:2])  # load + warm up
    t0 = time.perf_counter()
    for _ in range(repeats):
        ext.embed(batch)
    seconds = time.perf_counter() - t0
    n = len(batch) * repeats
    return {
        "name": f"{name} model only, {ext.device}, batch {len(batch)}",
        "images": n,
        "seconds": round(seconds, 3),
        "images_per_s": round(n / seconds, 1),
    }


def onnx_graphs(batch: np.ndarray, rounds: int) -> list[dict]:
    """Torch-free converter vs ``torch.onnx.export``: make time, images/s, max |diff|."""
    import onnxruntime as ort

    from lookalike.extract.cnn import export_onnx, export_onnx_with_torch, scale_input

    x = scale_input(batch)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        new = export_onnx(Path(tmp) / "converted.onnx")
        t_new = time.perf_counter() - t0
        t0 = time.perf_counter()
        import torch

        t_import = time.perf_counter() - t0
        t0 = time.perf_counter()
        old = export_onnx_with_torch(Path(tmp) / "torch-export.onnx")
        t_old = time.perf_counter() - t0
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = os.cpu_count() or 1
        opts.inter_op_num_threads = 1
        sessions = {
            name: ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            for name, path in [("converted", new), ("torch-export", old)]
        }
    from lookalike.extract.cnn import build_torch_model

    with torch.no_grad():
        ref = build_torch_model()(torch.from_numpy(x)).numpy()
    seconds = dict.fromkeys(sessions, 0.0)
    diffs = {}
    for name, sess in sessions.items():  # warm up, and the difference from eager torch
        diffs[name] = float(np.abs(sess.run(None, {"input": x})[0] - ref).max())
    for _ in range(rounds):
        for name, sess in sessions.items():
            t0 = time.perf_counter()
            sess.run(None, {"input": x})
            seconds[name] += time.perf_counter() - t0
    n = len(batch) * rounds
    rows = []
    for name, made in [("converted", t_new), ("torch-export", t_old)]:
        rows.append(
            {
                "name": f"cnn ONNX graph: {name}, batch {len(batch)}",
                "images": n,
                "seconds": round(seconds[name], 3),
                "images_per_s": round(n / seconds[name], 1),
                "make_s": round(made, 2),
                "max_abs_diff_vs_torch": float(f"{diffs[name]:.3g}"),
            }
        )
    rows[0]["vs_torch_export"] = round(seconds["torch-export"] / seconds["converted"], 2)
    rows[1]["torch_import_s"] = round(t_import, 2)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-listing", type=int, default=40, help="images per demo listing")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--json", action="store_true", help="one JSON object per row")
    ap.add_argument("--models-only", action="store_true", help="skip the index runs")
    ap.add_argument("--rounds", type=int, default=6, help="timed batches per ONNX graph")
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_demo(tmp, images_per_listing=args.per_listing, queries_per_listing=0, seed=1)
        photos = Path(tmp) / "photos"
        cores = os.cpu_count() or 1
        if not args.models_only:
            for workers in sorted({cores, 1, 0}, reverse=True):
                rows.append(index_rate(photos, "cnn", workers, args.batch_size))
            rows.append(index_rate(photos, "cnn-int8", cores, args.batch_size))
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
    graphs = onnx_graphs(batch, args.rounds)  # first: it times the import of torch
    onnx = model_rate("cpu", batch, repeats=args.rounds)
    int8 = model_rate("cpu", batch, repeats=args.rounds, name="cnn-int8")
    eager = model_rate("torch-cpu", batch, repeats=1)
    onnx["vs_torch_eager"] = round(onnx["images_per_s"] / eager["images_per_s"], 1)
    rows += [onnx, int8, eager, *graphs]

    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print(f"{'what':<52} {'images':>7} {'seconds':>8} {'images/s':>9}")
    for row in rows:
        extra = f"  ({row['vs_torch_eager']}x torch eager)" if "vs_torch_eager" in row else ""
        if "make_s" in row:
            extra = (
                f"  made in {row['make_s']} s, max |diff| vs torch "
                f"{row['max_abs_diff_vs_torch']:.2g}"
            )
            if "vs_torch_export" in row:
                extra += f", {row['vs_torch_export']}x the torch export's speed"
            if "torch_import_s" in row:
                extra += f" (+ {row['torch_import_s']} s to import torch)"
        print(
            f"{row['name']:<52} {row['images']:>7} {row['seconds']:>8.2f} "
            f"{row['images_per_s']:>9.1f}{extra}"
        )


if __name__ == "__main__":
    main()
