"""``dedup`` at its defaults on the public near-duplicate set: cosine alone vs. verified.

Writes the near-duplicate evaluation set (:func:`lookalike.evalsets.near_duplicates`: 431
originals from packaged photos, Tux Paint stamps and Fashion-MNIST, and 1,080 edited copies:
crop, flip, rotation, colour, blur, JPEG), indexes originals and copies into one fresh catalog
(default ``cnn``), then runs :func:`lookalike.analytics.near_duplicate_report` at the catalog's
default threshold twice, without and with geometric verification (:mod:`lookalike.analytics.
verify`), and prints for each:

* **recall**: the share of copies put in the same group as their original (per edit kind and
  per source of the originals too);
* **precision**: of the other images grouped with a copy, the share that are its original or
  another copy of it;
* **pair precision / recall**: over every pair of images inside one group vs. every pair of the
  same original (chained groups cost here);
* the time of the dedup call, the candidate pairs and how many were verified and joined.

Run: ``.venv/bin/python benchmarks/dedup.py [--json] [--threshold T]``; Tux Paint and
Fashion-MNIST need ``apt-get install tuxpaint-stamps-default dataset-fashion-mnist`` (without
them the set is the 20 packaged photos only).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from itertools import combinations
from pathlib import Path

import lookalike
from lookalike import evalsets
from lookalike.analytics.dedup import near_duplicate_report

Key = tuple[str, str]


def _set(name: str) -> str:
    """Which source an original's name comes from: ``tux``, ``fashion`` or ``photo``."""
    prefix = name.split("-")[0]
    return prefix if prefix in ("tux", "fashion") else "photo"


def score(groups: list[list[Key]], label: dict[str, str], kind: dict[str, str]) -> dict:
    """The figures of the module docstring for ``groups`` (image ids -> original name)."""
    group_of = {iid: g for g, members in enumerate(groups) for _, iid in members}
    copies = [iid for iid in label if iid in kind]
    original = {label[iid]: iid for iid in label if iid not in kind}
    found: Counter[str] = Counter()
    found_in: Counter[str] = Counter()
    right = wrong = 0
    for iid in copies:
        g = group_of.get(iid)
        hit = g is not None and group_of.get(original[label[iid]]) == g
        found[kind[iid]] += hit
        found_in[_set(label[iid])] += hit
        for _, other in groups[g] if g is not None else []:
            if other != iid:
                same = label.get(other) == label[iid]
                right, wrong = right + same, wrong + (not same)
    per_kind = Counter(kind[iid] for iid in copies)
    per_set = Counter(_set(label[iid]) for iid in copies)
    true_pairs = sum(n * (n - 1) // 2 for n in Counter(label.values()).values())
    tp = fp = 0
    for members in groups:
        for (_, a), (_, b) in combinations(members, 2):
            same = label.get(a) is not None and label.get(a) == label.get(b)
            tp, fp = tp + same, fp + (not same)
    return {
        "recall": sum(found.values()) / len(copies),
        "precision": right / max(right + wrong, 1),
        "recall_by_kind": {k: found[k] / per_kind[k] for k in sorted(per_kind)},
        "recall_by_set": {k: found_in[k] / per_set[k] for k in sorted(per_set)},
        "pair_precision": tp / max(tp + fp, 1),
        "pair_recall": tp / true_pairs,
        "groups": len(groups),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--extractor", default="cnn")
    ap.add_argument("--json", action="store_true", help="one JSON object per row")
    ap.add_argument(
        "--threshold", type=float, help="instead of the default (e.g. 0.876: the one before)"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        s = evalsets.near_duplicates(Path(tmp) / "sets")
        label: dict[str, str] = {}
        kind: dict[str, str] = {}
        for _path, name in s.images:
            label[f"{name}/original.png"] = name
        for path, name in s.queries:
            iid = f"{name}/{Path(path).name}"
            label[iid], kind[iid] = name, Path(path).stem
        with lookalike.open_catalog(Path(tmp) / "cat", extractor=args.extractor) as cat:
            t0 = time.perf_counter()
            cat.index([s.folder / "images", s.folder / "queries"])
            indexed = time.perf_counter() - t0
            if not args.json:
                print(f"{cat.count()} images indexed in {indexed:.1f} s ({cat.model.tag})")
            for verify in (False, True, True):  # the second verified run reads cached thumbs
                t0 = time.perf_counter()
                rep = near_duplicate_report(cat, args.threshold, verify=verify)
                row = {
                    "verify": verify,
                    "seconds": round(time.perf_counter() - t0, 2),
                    "threshold": rep.threshold,
                    "floor": rep.floor,
                    "candidates": rep.candidates,
                    "verified": rep.verified,
                    "joined": rep.joined,
                    "unreadable": rep.unreadable,
                    **score(rep.groups, label, kind),
                }
                if args.json:
                    print(json.dumps(row))
                    continue
                kinds = ", ".join(
                    f"{k} {v:.2f}"
                    for k, v in {**row["recall_by_kind"], **row["recall_by_set"]}.items()
                )
                print(
                    f"verify={verify!s:5}  recall {row['recall']:.3f}  precision "
                    f"{row['precision']:.3f}  pairs P {row['pair_precision']:.3f} "
                    f"R {row['pair_recall']:.3f}  {row['groups']} groups  "
                    f"{row['seconds']:.1f} s  candidates {rep.candidates}, verified "
                    f"{rep.verified}, joined {rep.joined}\n    by kind and source: {kinds}"
                )


if __name__ == "__main__":
    main()
