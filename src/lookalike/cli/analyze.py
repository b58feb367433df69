"""Recognition and analytics commands: ``train`` and ``predict`` (classifiers on the stored
vectors), ``analyze clusters``, ``analyze outliers``, ``analyze map``, ``dedup`` and ``eval``.

The all-pairs analytics (``analyze outliers --method knn``, ``dedup``) take ``--index`` with
the meaning and the choices of ``search --index``: which engine answers the neighbour queries.
``analyze ...`` is registered on :data:`analyze_app` (mounted as ``analyze``), the rest on
:data:`commands` (merged into the top level).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import LookalikeError
from ..types import IndexKind
from .common import (
    CatalogOpt,
    FormatOpt,
    NeighbourIndexOpt,
    NprobeOpt,
    OutputFormat,
    ProgressOpt,
    command,
    opened,
    out,
    parse_threshold,
    print_json,
    say,
    usage_error,
)

commands = typer.Typer()
analyze_app = typer.Typer(
    help="Clusters, outliers and a 2-D map of the collection.", no_args_is_help=True
)

OUTLIER_METHODS = ("knn", "isolation-forest")
DEDUP_SHOWN = 50
"""Groups printed by ``dedup`` in table format (all of them go to ``--csv`` and JSON)."""


@command(commands)
def train(
    catalog: CatalogOpt,
    labels: Annotated[
        str | None, typer.Option(help="CSV with image_id,label (and optionally listing_id).")
    ] = None,
    label_from: Annotated[
        str | None,
        typer.Option(help="Label each image by its 'listing' id or its 'parent' folder."),
    ] = None,
    model: Annotated[str, typer.Option(help="logreg (default) or mlp.")] = "logreg",
    grid: Annotated[
        bool, typer.Option(help="Choose hyper-parameters by 3-fold grid search on the train split.")
    ] = False,
    test_size: Annotated[float, typer.Option(help="Held-out fraction (stratified).")] = 0.25,
    fmt: FormatOpt = OutputFormat.TABLE,
) -> None:
    """Train a classifier on the stored vectors; print held-out accuracy, macro precision /
    recall / F1 and the confusion matrix; save it in the catalog (used by `predict`, the
    stream and the HTTP API)."""
    from ..recognize import labels_from
    from ..recognize import train as train_classifier

    if bool(labels) == bool(label_from):
        usage_error("give exactly one of --labels FILE and --label-from listing|parent")
    with opened(catalog) as cat:
        lab = labels_from(cat, labels or label_from or "")
        _, report = train_classifier(cat, lab, model=model, grid=grid, test_size=test_size)
    d = report.to_dict()
    if fmt == OutputFormat.JSON:
        print_json(d)
        return
    say(
        f"{model} on {d['n_train']} train / {d['n_test']} held-out images "
        f"({d['seconds']:.1f} s); params {d['params'] or 'default'}"
    )
    for key in ("accuracy", "macro_precision", "macro_recall", "macro_f1"):
        say(f"{key:>16}: {d[key]:.4f}")
    table = Table(
        title="confusion matrix (rows: true label, columns: predicted label number)",
        title_justify="left",
    )
    table.add_column("true label")
    for n in range(len(d["labels"])):
        table.add_column(str(n + 1), justify="right")
    for n, (label, row) in enumerate(zip(d["labels"], d["confusion"], strict=True)):
        table.add_row(f"{n + 1} {escape(str(label))}", *[str(v) if v else "." for v in row])
    out.print(table)


@command(commands)
def predict(
    images: Annotated[list[str], typer.Argument(help="Image files or URLs.")],
    catalog: CatalogOpt,
    k: Annotated[int, typer.Option("-k", "--k", help="Labels per image.")] = 3,
    fmt: FormatOpt = OutputFormat.TABLE,
) -> None:
    """Recognize images with the catalog's classifier: top-k labels with probabilities."""
    with opened(catalog) as cat:
        preds = cat.predict(images, k=k)
    for image, top in zip(images, preds, strict=True):
        if fmt == OutputFormat.JSON:
            print_json(
                {
                    "image": image,
                    "predictions": [{"label": lab, "probability": round(p, 6)} for lab, p in top],
                }
            )
        else:
            say(f"{image}: " + ", ".join(f"{lab} {p:.3f}" for lab, p in top))


@command(analyze_app, "clusters")
def analyze_clusters(
    catalog: CatalogOpt,
    k: Annotated[
        int | None, typer.Option("-k", "--k", help="Clusters (default: sqrt(n / 2)).")
    ] = None,
    fmt: FormatOpt = OutputFormat.TABLE,
) -> None:
    """Spherical k-means (faiss) of the vectors; cluster and distance stored per image."""
    from ..analytics import kmeans

    with opened(catalog) as cat:
        report = kmeans(cat, k=k)
    if fmt == OutputFormat.JSON:
        print_json(report.to_dict())
        return
    table = Table(title=f"k = {report.k}", title_justify="left")
    for col in ("cluster", "size", "representative"):
        table.add_column(col, justify="right" if col != "representative" else "left")
    for c in report.clusters:
        table.add_row(str(c.id), str(c.size), escape(c.representative))
    out.print(table)


@command(analyze_app, "outliers")
def analyze_outliers(
    catalog: CatalogOpt,
    top: Annotated[int, typer.Option(help="How many to list.")] = 10,
    method: Annotated[
        str, typer.Option(help="knn (1 - mean cosine to the k nearest) or isolation-forest.")
    ] = "knn",
    k: Annotated[int, typer.Option("-k", "--k", help="Neighbours of the knn score.")] = 10,
    index: NeighbourIndexOpt = IndexKind.EXACT,
    nprobe: NprobeOpt = None,
    progress: ProgressOpt = True,
    fmt: FormatOpt = OutputFormat.TABLE,
) -> None:
    """Score every image by how unusual it is; the score is stored per image (the web page's
    Explore view rings the most unusual). knn: 1 - mean cosine to the k nearest images.

    With --index ivf the neighbours come from the IVF cell join, which gives upper bounds;
    the --top listed are re-scored until they and their scores are exactly the exact path's.
    """
    from ..analytics import isolation_outliers, knn_outliers

    if method not in OUTLIER_METHODS:
        raise LookalikeError(f"method must be {' or '.join(OUTLIER_METHODS)}")
    with opened(catalog) as cat:
        if method == "knn":
            report = knn_outliers(cat, k=k, index=index, nprobe=nprobe, top=top, progress=progress)
        else:
            report = isolation_outliers(cat)
    rows = report.top(top)
    if fmt == OutputFormat.JSON:
        print_json(
            {
                "method": report.method,
                "outliers": [
                    {"listing_id": lid, "image_id": iid, "score": round(sc, 6)}
                    for lid, iid, sc in rows
                ],
            }
        )
        return
    for lid, iid, sc in rows:
        say(f"{sc:.4f}  {lid}  {iid}")


@command(analyze_app, "map")
def analyze_map(
    catalog: CatalogOpt,
    png: Annotated[Path | None, typer.Option(help="Also draw the map into this PNG.")] = None,
    method: Annotated[str, typer.Option(help="pca, or umap when umap-learn is installed.")] = "pca",
) -> None:
    """Compute the 2-D map of the collection (stored for the web page's Explore view)."""
    from ..analytics import project, render_map_png

    with opened(catalog) as cat:
        keys, _, used = project(cat, method=method)
        drawn = render_map_png(str(png), cat) if png else None
    drawn_note = (
        f"; drawn to {png} ({drawn['clusters']} clusters, "
        f"{drawn['outliers_marked']} outliers marked)"
        if drawn
        else ""
    )
    say(f"{used} map of {len(keys)} images stored{drawn_note}")


@command(commands)
def calibrate(
    catalog: CatalogOpt,
    sample: Annotated[
        int, typer.Option(min=8, help="Stored images to copy (each gives 6 edited copies).")
    ] = 100,
    precision: Annotated[
        float,
        typer.Option(min=0.5, max=1.0, help="Precision the threshold must keep (0.5-1)."),
    ] = 0.99,
    seed: Annotated[int, typer.Option(help="Sampling and edit randomness.")] = 0,
    progress: ProgressOpt = True,
    fmt: FormatOpt = OutputFormat.TABLE,
) -> None:
    """Measure this catalog's near-duplicate threshold and store it (dedup then uses it).

    Samples stored images whose source file can be read, makes one edited copy of each per
    kind (crop, flip, rotation, colour, blur, JPEG), embeds the copies, and scores each against
    its original (a true pair) and against the best images of every other listing (false
    pairs). The threshold is the lowest one that keeps --precision over those pairs: the most
    near-duplicates found for that precision. Prints it with the precision and recall measured
    there, per edit kind too.

    Example:

      lookalike calibrate -c ./cat --sample 200 && lookalike dedup -c ./cat
    """
    from ..analytics import calibrate as run_calibration

    with opened(catalog) as cat:
        cal = run_calibration(
            cat, sample=sample, target_precision=precision, seed=seed, progress=progress
        )
    if fmt == OutputFormat.JSON:
        print_json(cal.to_dict())
        return
    say(
        f"near-duplicate threshold {cal.threshold:.4f}: precision {cal.precision:.3f}, recall "
        f"{cal.recall:.3f} on {cal.positives} edited copies of {cal.sampled} images "
        f"({cal.negatives} other pairs); stored with the catalog"
    )
    say("recall by edit: " + ", ".join(f"{k} {v:.2f}" for k, v in cal.recall_by_kind.items()))
    if not cal.exact:
        say("note: some copies had 50 other-listing scores above it; precision is an upper bound")


@command(commands)
def dedup(
    catalog: CatalogOpt,
    threshold: Annotated[
        str,
        typer.Option(
            help="Near-duplicates: images with score (cosine) > THRESHOLD. 'auto': the "
            "catalog's calibrated threshold (lookalike calibrate), else the extractor's "
            "measured default."
        ),
    ] = "auto",
    verify: Annotated[
        bool,
        typer.Option(
            help="Also check pairs scoring between the verification floor and THRESHOLD on "
            "their thumbnails (SIFT keypoints + RANSAC): finds crops and rotations, which "
            "score among mere look-alikes. Needs the source files or cached thumbnails."
        ),
    ] = True,
    floor: Annotated[
        float | None,
        typer.Option(
            help="Lowest score (cosine) checked by --verify (default: the extractor's "
            "measured floor, cnn 0.5; none known: no check).",
            min=-1.0,
            max=1.0,
        ),
    ] = None,
    exact: Annotated[
        bool, typer.Option(help="Identical files (SHA-256) instead of near-duplicates.")
    ] = False,
    index: NeighbourIndexOpt = IndexKind.EXACT,
    nprobe: NprobeOpt = None,
    progress: ProgressOpt = True,
    csv_out: Annotated[
        Path | None, typer.Option("--csv", help="Write group,listing_id,image_id rows here.")
    ] = None,
    fmt: FormatOpt = OutputFormat.TABLE,
) -> None:
    """Find groups of near-duplicate (or identical) images: connected components of the
    score > threshold graph, from the engine's threshold search (no n x n matrix), plus the
    pairs below the threshold that their thumbnails show to be the same photo (--verify).

    On millions of images, build an IVF index first (`lookalike ann build --kind ivf`) and
    pass --index ivf: each cell of the index is then joined with its 16 nearest cells only
    (float32 block products, exact scores), a fraction of the all-pairs work; it may miss a
    pair, never invent one. (--exact here means identical files; the exact engine is
    --index exact, the default.)

    Examples:

      lookalike dedup -c ./cat                      # threshold auto, verified
      lookalike dedup -c ./cat --no-verify --threshold 0.95 --csv dups.csv
    """
    from ..analytics import exact_duplicates, near_duplicate_report, near_duplicate_threshold

    value = parse_threshold(threshold)
    with opened(catalog) as cat:
        used, source = 0.0, ""
        report = None
        if exact:
            groups = exact_duplicates(cat)
        else:
            used, source = (value, "given") if value is not None else near_duplicate_threshold(cat)
            report = near_duplicate_report(
                cat,
                threshold=used,
                index=index,
                nprobe=nprobe,
                progress=progress,
                verify=verify,
                floor=floor,
            )
            groups = report.groups
    if csv_out:
        with open(csv_out, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["group", "listing_id", "image_id"])
            for i, g in enumerate(groups):
                writer.writerows([i, lid, iid] for lid, iid in g)
    if fmt == OutputFormat.JSON:
        doc: dict[str, object] = {"groups": [[iid for _, iid in g] for g in groups]}
        if report is not None:
            doc.update(threshold=round(used, 6), threshold_source=source)
            doc["verification"] = {
                "floor": report.floor,
                "candidates": report.candidates,
                "verified": report.verified,
                "joined": report.joined,
                "unreadable": report.unreadable,
            }
        print_json(doc)
        return
    if report is None:
        say(f"{len(groups)} group(s) of identical images")
    else:
        say(f"{len(groups)} group(s) of near-duplicate images (score > {used:.4f}: {source})")
        if report.floor is not None:
            say(
                f"verified {report.verified} of {report.candidates} pair(s) scoring "
                f"{report.floor:.4f}-{used:.4f} on their thumbnails: {report.joined} the same "
                "photo"
            )
        elif verify:
            say("no pair verified: no verification floor is known for this extractor (--floor)")
        if report.unreadable:
            say(
                f"warning: {report.unreadable} image(s) have no readable thumbnail, their "
                f"pairs were not verified; first: {report.problems[0]}"
            )
    for i, g in enumerate(groups[:DEDUP_SHOWN]):
        more = " ..." if len(g) > 8 else ""
        say(f"{i:>4}  ({len(g)})  " + ", ".join(iid for _, iid in g[:8]) + more)


@command(commands, "eval")
def eval_(
    catalog: CatalogOpt,
    queries: Annotated[
        Path,
        typer.Option(
            help="Folder of query images in <listing_id>/ subfolders (the relevant listing)."
        ),
    ],
    k: Annotated[int, typer.Option("-k", "--k", help="Cut-off for precision@k, recall@k.")] = 10,
    baseline: Annotated[
        str | None,
        typer.Option(
            help="Also evaluate another extractor (e.g. colorhist, hog) on the same "
            "images, re-indexed from their source files, for comparison."
        ),
    ] = None,
    fmt: FormatOpt = OutputFormat.TABLE,
) -> None:
    """Measure retrieval quality: top-1, precision@k, recall@k and mAP over labelled queries."""
    from ..evaluate import evaluate, evaluate_baseline, query_set

    with opened(catalog) as cat:
        qs = query_set(queries)
        report = evaluate(cat, qs, k=k)
        name = cat.model.name if cat.model else "catalog"
        base = evaluate_baseline(cat, qs, baseline, k=k) if baseline else None
    d = report.to_dict()
    if fmt == OutputFormat.JSON:
        print_json({**d, "baseline": {"extractor": baseline, **base.to_dict()}} if base else d)
        return
    table = Table(title=f"{d['n_queries']} queries, k={k}", title_justify="left")
    table.add_column("metric")
    table.add_column(escape(name), justify="right")
    if base:
        table.add_column(f"{escape(str(baseline))} (baseline)", justify="right")
    for key in ("top1", "precision_at_k", "recall_at_k", "mAP"):
        row = [key, f"{d[key]:.4f}"]
        if base:
            row.append(f"{base.to_dict()[key]:.4f}")
        table.add_row(*row)
    out.print(table)
