"""Near-duplicate thresholds of each extractor, measured on edited copies of public images.

Two sets, each indexed into a fresh catalog per extractor:

* ``demo``: the demo collection (``lookalike demo``: 84 photos built from 14 photos that ship
  inside installed wheels, 14 listings). Few, very different subjects: easy negatives.
* ``fashion``: the first ``--fashion N`` images of Fashion-MNIST's test set (Debian package
  ``dataset-fashion-mnist``: 28x28 grey photos of clothing, upscaled to 112x112), one listing
  each: thousands of look-alike garments, hard negatives. Skipped when the package is absent.

For each, :func:`lookalike.analytics.calibrate.score_pairs` makes one copy of sampled images per
edit kind (crop, flip, rotation, colour, blur, JPEG) and scores copy-vs-original (positives)
against copy-vs-other-listings (each copy's 50 best: negatives). Printed per extractor and
set: the lowest threshold with precision >= 0.99, and precision/recall at the installed
default (``lookalike.extract.NEAR_DUPLICATE_THRESHOLDS``; for a model without one, the
proposed default: the highest of the per-set thresholds, so it keeps the target on both) and
at the old fixed default 0.95. The proposed default is printed in a comment line; the installed
``cnn`` one is the highest of these sets' and the near-duplicate set's of
``benchmarks/descriptors.py``.

Run: ``.venv/bin/python benchmarks/calibrate.py [--extractors cnn,hog,colorhist]
[--fashion 2000] [--sample 300] [--seed 0]``
"""

from __future__ import annotations

import argparse
import gzip
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

import lookalike
from lookalike.analytics.calibrate import (
    DEFAULT_PRECISION,
    RESAVE_QUALITY,
    SAME_IMAGE_QUANTILE,
    choose_threshold,
    score_pairs,
)
from lookalike.demo import write_demo
from lookalike.extract import default_near_duplicate_threshold

FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
OLD_DEFAULT = 0.95


def write_fashion(folder: Path, n: int) -> Path | None:
    """The first ``n`` Fashion-MNIST test images as 112x112 PNGs, one folder (listing) each."""
    if not FASHION.exists():
        return None
    raw = gzip.decompress(FASHION.read_bytes())
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    for i, img in enumerate(images):
        out = folder / f"f{i:05d}"
        out.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).resize((112, 112), Image.Resampling.BICUBIC).save(out / "0.png")
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--extractors", default="cnn,hog,colorhist")
    ap.add_argument("--precision", type=float, default=DEFAULT_PRECISION)
    ap.add_argument("--fashion", type=int, default=2000, help="Fashion-MNIST images indexed")
    ap.add_argument("--sample", type=int, default=300, help="images copied per set")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sets = {"demo": Path(tmp) / "demo" / "photos"}
        write_demo(Path(tmp) / "demo")
        fashion = write_fashion(Path(tmp) / "fashion", args.fashion)
        if fashion is not None:
            sets["fashion"] = fashion
        print(
            "| extractor | set | threshold at precision 0.99 | recall there | "
            "at the default: threshold, precision, recall | at 0.95: precision, recall |"
        )
        print("|---|---|---|---|---|---|")
        for name in args.extractors.split(","):
            pairs = {}
            for set_name, folder in sets.items():
                with lookalike.open_catalog(
                    Path(tmp) / f"{name}-{set_name}", extractor=name
                ) as cat:
                    cat.index([folder], workers=0)
                    pairs[set_name] = score_pairs(cat, sample=args.sample, seed=args.seed)
                    model = cat.model
            own = {
                s: choose_threshold(p.positives, p.negatives, args.precision)
                for s, p in pairs.items()
            }
            proposed = max(t for t, _, _ in own.values())
            installed = default_near_duplicate_threshold(model) if model else None
            default = proposed if installed is None else installed
            for set_name, p in pairs.items():
                t, _, r = own[set_name]
                dp, dr, _ = p.at(default)
                op, orc, _ = p.at(OLD_DEFAULT)
                print(
                    f"| `{name}` | {set_name} ({len(p.positives)} copies, "
                    f"{len(p.negatives)} negatives) | {t:.3f} | {r:.3f} | "
                    f"{default:.3f}, {dp:.3f}, {dr:.3f} | {op:.3f}, {orc:.3f} |"
                )
            print(f"<!-- {model.tag if model else name}: proposed {proposed:.3f} -->")
            for set_name, p in pairs.items():  # the "same image" score band (analytics.bands)
                if len(p.resaved):
                    q = float(np.quantile(p.resaved, SAME_IMAGE_QUANTILE))
                    print(
                        f"<!-- {name} {set_name} same_image (q{SAME_IMAGE_QUANTILE:g} of "
                        f"{len(p.resaved)} JPEG-q{RESAVE_QUALITY} re-saves): {q:.4f} -->"
                    )


if __name__ == "__main__":
    main()
