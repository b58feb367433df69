"""Catalog and search commands: ``index``, ``search``, ``results``, ``stats``, ``delete``,
``config``, ``extractors`` and ``demo``.

They are registered on :data:`commands`, a typer app without a name that
:mod:`lookalike.cli` merges into the top level.
"""

from __future__ import annotations

import csv
import functools
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer

from ..errors import NotFoundError
from ..types import Aggregation, CodeKind, GroupBy, IndexKind, SearchResult
from .common import (
    EXIT_PARTIAL,
    CatalogOpt,
    DeviceOpt,
    EngineOpt,
    FormatOpt,
    OutputFormat,
    ProgressOpt,
    command,
    interrupted_exit,
    opened,
    parse_age,
    parse_threshold,
    print_hit_lines,
    print_json,
    print_results,
    say,
    term_as_interrupt,
    usage_error,
    warn,
)

if TYPE_CHECKING:
    from ..catalog import Catalog

commands = typer.Typer()

FAILED_SHOWN = 20
"""Failed files listed on stderr by ``index`` (all of them go to ``--failed-csv``)."""


@command(commands)
def index(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Folders (recursive; listing_id = parent folder name, image_id = path under the "
            "folder), list files (.txt: one path/URL a line), manifests (.csv/.parquet with "
            "listing_id,image_id,path), image files or http(s) URLs."
        ),
    ],
    catalog: CatalogOpt,
    extractor: Annotated[
        str,
        typer.Option(
            help="Extractor for a new catalog: cnn (EfficientNet-Lite0, 1280-d), cnn-int8 (the "
            "same network in 8-bit integers: CPU only, ~1.6x faster), hog (1764-d), colorhist "
            "(512-d); `lookalike extractors` lists them. An existing catalog keeps its own."
        ),
    ] = "",
    workers: Annotated[
        int | None,
        typer.Option(
            help="Decode worker processes (default: one per core; 0 = decode in-process)."
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option(help="Images per model call and per transaction.")
    ] = 32,
    device: DeviceOpt = "auto",
    failed_csv: Annotated[
        Path | None, typer.Option(help="Write failed files as CSV (location,reason).")
    ] = None,
    progress: ProgressOpt = True,
    fmt: FormatOpt = OutputFormat.TABLE,
) -> None:
    """Extract feature vectors from images and store them in the catalog.

    Idempotent: images already stored with the same bytes are skipped, so re-running the same
    command adds nothing and an interrupted run resumes. A file that cannot be decoded is
    reported and skipped; the exit code is 3 if any failed. Ctrl-C or SIGTERM commits the
    batch in hand, prints the summary so far and exits 130 (SIGINT) or 143 (SIGTERM).
    """
    import signal

    interrupted = None
    try:
        with (
            term_as_interrupt() as received,
            opened(catalog, extractor=extractor or None, device=device, create=True) as cat,
        ):
            report = cat.index(inputs, workers=workers, batch_size=batch_size, progress=progress)
    except KeyboardInterrupt as exc:
        interrupted = exc
    if interrupted is not None:
        code = interrupted_exit(received)
        partial = getattr(interrupted, "report", None)  # IndexInterrupted: the run so far
        if partial is not None:
            say(partial.summary())
        warn(
            f"interrupted ({signal.Signals(code - 128).name}): committed batches are kept; "
            "run the same command to resume"
        )
        raise typer.Exit(code) from None
    if failed_csv:
        with open(failed_csv, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["location", "reason"])
            writer.writerows(report.failed)
    for _, reason in report.failed[:FAILED_SHOWN]:
        warn(f"failed: {reason}")
    if len(report.failed) > FAILED_SHOWN:
        warn(f"... and {len(report.failed) - FAILED_SHOWN} more")
    if fmt == OutputFormat.JSON:
        print_json(
            {
                "added": report.added,
                "updated": report.updated,
                "skipped": report.skipped,
                "failed": [{"location": loc, "reason": why} for loc, why in report.failed],
                "seconds": round(report.seconds, 3),
                "images_per_s": round(report.images_per_s, 2),
            }
        )
    else:
        say(report.summary())
    if report.failed:
        raise typer.Exit(EXIT_PARTIAL)


@command(commands)
def search(
    catalog: CatalogOpt,
    query: Annotated[
        str | None, typer.Argument(help="Query image file or URL (or use --id / --vector).")
    ] = None,
    image_id: Annotated[
        str | None,
        typer.Option("--id", help="Search by a stored image id, e.g. truck-17/front.jpg."),
    ] = None,
    listing: Annotated[
        str | None,
        typer.Option(help="Listing of --id, when the same image id exists in several listings."),
    ] = None,
    vector: Annotated[
        Path | None,
        typer.Option(
            help="Search by a vector: a .npy file of shape (d,), or (n, d) for n "
            "queries (one result each)."
        ),
    ] = None,
    k: Annotated[
        int | None,
        typer.Option("-k", "--k", help="Number of hits (default 10; unlimited with --threshold)."),
    ] = None,
    group_by: Annotated[
        GroupBy | None, typer.Option(help="listing: one hit per listing, scored by --agg.")
    ] = None,
    agg: Annotated[
        Aggregation,
        typer.Option(
            help="Per-listing score: max, mean, or sum-top-n (sum of the --top-n best images)."
        ),
    ] = Aggregation.MAX,
    top_n: Annotated[int, typer.Option(help="n of sum-top-n.")] = 3,
    threshold: Annotated[
        str | None,
        typer.Option(
            help="Only hits with score > THRESHOLD (score = cosine, in [-1, 1]); 'auto': the "
            "near-duplicate threshold (`lookalike calibrate`, else the extractor's default), "
            "so the hits are the query's near-copies."
        ),
    ] = None,
    where: Annotated[
        str | None,
        typer.Option(
            help="Filter on listing attributes, e.g. \"stock_level > 0 and category = 'vehicle'\"."
        ),
    ] = None,
    save: Annotated[
        bool,
        typer.Option(
            help="Write the hits to the catalog's query_results under the printed query_id "
            "(`lookalike results QUERY_ID` shows them)."
        ),
    ] = False,
    index: Annotated[
        IndexKind | None,
        typer.Option(
            help="Where candidates come from: exact (every vector scored), ivf, ivfpq, hnsw (a "
            "built ANN index, `lookalike ann build`; candidates re-scored exactly), or auto (an "
            "ANN index once built and the collection is large). Default: the catalog's "
            "`config --index` setting."
        ),
    ] = None,
    bands: Annotated[
        bool,
        typer.Option(
            help="Name each score's band: same image, near copy, similar or unrelated, from "
            "the catalog's calibration (`lookalike calibrate`) or the extractor's defaults."
        ),
    ] = True,
    engine: EngineOpt = None,
    device: DeviceOpt = "auto",
    fmt: FormatOpt = OutputFormat.TABLE,
) -> None:
    """Find the images (or listings) most like a query: exact inner product over every vector.

    Examples:

      lookalike search query.jpg -c ./cat -k 5 --group-by listing

      lookalike search --id chelsea/chelsea-01.jpg -c ./cat --threshold 0.8

      lookalike search photo.jpg -c ./cat --threshold auto    # its near-copies

      lookalike search q.jpg -c ./cat --where "stock_level > 0" --save --format json
    """
    value = parse_threshold(threshold) if threshold is not None else None
    with opened(catalog, device=device, engine=engine) as cat:
        if threshold is not None and value is None:
            from ..analytics import near_duplicate_threshold

            value, source = near_duplicate_threshold(cat)
            warn(f"threshold {value:.4f} ({source})")
        vec = np.load(vector) if vector is not None else None
        if vec is not None and vec.ndim == 2:
            run = functools.partial(cat.search_batch, vec)
        else:
            run = functools.partial(_one, cat, query, image_id, listing, vec)
        results = run(
            k=k,
            group_by=group_by,
            agg=agg,
            top_n=top_n,
            threshold=value,
            where=where,
            save=save,
            index=index,
        )
        band = None
        if bands and any(r.hits for r in results):
            from ..analytics import score_bands

            band = score_bands(cat).band
    print_results(results, fmt, grouped=group_by is not None, band=band)


def _one(
    cat: Catalog,
    query: str | None,
    image_id: str | None,
    listing: str | None,
    vector: np.ndarray | None,
    **options: Any,
) -> list[SearchResult]:
    """One query (image, stored id or ``(d,)`` vector) as a list of one result."""
    return [cat.search(query, image_id=image_id, listing_id=listing, vector=vector, **options)]


@command(commands)
def results(
    catalog: CatalogOpt,
    query_id: Annotated[
        str | None, typer.Argument(help="A query_id printed by search --save.")
    ] = None,
    delete: Annotated[
        bool, typer.Option("--delete", help="Delete the hits saved under QUERY_ID.")
    ] = False,
    older_than: Annotated[
        str | None,
        typer.Option(
            help="Without QUERY_ID: delete the results of every search saved longer ago than "
            "this age (7d, 12h, 30m, 90s, 2w; a number is seconds).",
        ),
    ] = None,
    fmt: FormatOpt = OutputFormat.TABLE,
) -> None:
    """Show the hits a search saved with --save (QUERY_ID), delete them (QUERY_ID --delete), or
    prune old saved results (--older-than 7d). `lookalike serve` prunes on its own
    (--results-ttl, default 7 days)."""
    if (query_id is None) == (older_than is None) or (delete and query_id is None):
        usage_error("give QUERY_ID (to show, or with --delete to delete), or --older-than AGE")
    if older_than is not None:
        age = parse_age(older_than, "--older-than")
        with opened(catalog) as cat:
            n = cat.prune_results(age)
        if fmt == OutputFormat.JSON:
            print_json({"pruned": n, "older_than_s": age})
        else:
            say(f"pruned {n} saved search{'es' if n != 1 else ''} older than {older_than}")
        return
    assert query_id is not None
    with opened(catalog) as cat:
        if delete:
            cat.delete_results(query_id)
        else:
            result = cat.saved_results(query_id)
    if delete:
        if fmt == OutputFormat.JSON:
            print_json({"deleted": query_id})
        else:
            say(f"deleted the results of {query_id}")
    elif fmt == OutputFormat.JSON:
        print_json(result.to_dict())
    else:
        print_hit_lines(result)


@command(commands)
def stats(catalog: CatalogOpt, fmt: FormatOpt = OutputFormat.TABLE) -> None:
    """Catalog facts: model, number of images and listings, engine (read from the store: no
    vector is loaded)."""
    with opened(catalog) as cat:
        facts = cat.stats()
    if fmt == OutputFormat.JSON:
        print_json(facts)
        return
    for key, value in facts.items():
        if key in ("cache_bytes", "codes_bytes") and value is not None:
            value = f"{value} ({value / 2**20:.1f} MiB)"
        if value is None:
            value = "-"
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        if key == "model_current" and value is False:
            value = f"no: re-extract with `lookalike reindex --catalog {catalog}`"
        elif key == "model_current":
            value = {True: "yes", "-": "- (no installed extractor makes it)"}[value]
        say(f"{key:>12}: {value}")


@command(commands)
def delete(
    image_id: Annotated[str, typer.Argument(help="Stored image id to delete.")],
    catalog: CatalogOpt,
    listing: Annotated[str | None, typer.Option(help="Listing, if the id is ambiguous.")] = None,
) -> None:
    """Delete a stored image (the next search no longer returns it)."""
    with opened(catalog) as cat:
        n = cat.delete(image_id, listing)
    if n == 0:
        raise NotFoundError(f"no image {image_id!r}")
    say(f"deleted {n} image(s)")


@command(commands)
def config(
    catalog: CatalogOpt,
    codes: Annotated[
        CodeKind | None,
        typer.Option(
            help="What the exact scan reads: int8 (default, 1 byte a value), float16, float32. "
            "Answers are exact with all three; int8 scans 4x fewer bytes."
        ),
    ] = None,
    rerank: Annotated[
        int | None,
        typer.Option(help="Candidates re-scored exactly per requested hit (default 4)."),
    ] = None,
    index: Annotated[
        IndexKind | None,
        typer.Option(help="Default of search --index (same choices; default auto)."),
    ] = None,
) -> None:
    """Show or change the catalog's search settings (stored in the catalog)."""
    with opened(catalog) as cat:
        settings = cat.configure(codes=codes, rerank=rerank, index=index)
    for key, value in settings.items():
        say(f"{key:>8}: {value}")


@command(commands)
def extractors(
    prepare: Annotated[
        bool,
        typer.Option(help="Build and verify the cnn ONNX file now (otherwise done on first use)."),
    ] = False,
) -> None:
    """List the available extractors (name, dimension, version)."""
    from ..extract import available_extractors, get_extractor

    for name in available_extractors():
        info = get_extractor(name).info
        say(f"{name:>10}  d={info.dim:<5} {info.version}")
    if prepare:
        from ..extract.cnn import export_onnx, onnx_path

        path = onnx_path()
        say(f"cnn ONNX: {export_onnx(path) if not path.exists() else path}")


@command(commands)
def demo(
    folder: Annotated[Path, typer.Argument(help="Where to write the demo collection.")],
    images_per_listing: Annotated[int, typer.Option(help="Indexed variants per photo.")] = 6,
    queries_per_listing: Annotated[int, typer.Option(help="Held-out query variants.")] = 2,
    seed: Annotated[int, typer.Option(help="Random seed of the variants.")] = 0,
) -> None:
    """Write a demo collection of real photos (from scikit-image and scikit-learn; no download).

    Each of 14 photos becomes a listing of seeded variants (crop, mirror, rotation, colour,
    JPEG quality) in FOLDER/photos, with held-out queries in FOLDER/queries and listing
    attributes in FOLDER/listings.csv.
    """
    from ..demo import write_demo

    counts = write_demo(folder, images_per_listing, queries_per_listing, seed)
    say(
        f"wrote {counts['images']} images in {counts['listings']} listings to {folder}/photos, "
        f"{counts['queries']} queries to {folder}/queries. Next:\n"
        f"  lookalike index {folder}/photos --catalog {folder}/cat\n"
        f"  lookalike listing import {folder}/listings.csv --catalog {folder}/cat\n"
        f"  lookalike search {folder}/queries/chelsea/q-01.jpg --catalog {folder}/cat "
        "-k 5 --group-by listing"
    )
