"""The ``lookalike`` command: a thin layer over :class:`lookalike.Catalog`.

Exit codes: 0 success; 1 error (message on stderr); 2 usage error; 3 ``index`` finished but
some images failed (listed on stderr and, with ``--failed-csv``, in a file).
"""

from __future__ import annotations

import csv
import inspect
import json
import logging
import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from .errors import LookalikeError
from .values import parse_value

app = typer.Typer(
    name="lookalike",
    help=(
        "Semantic image search: index images into a catalog of feature vectors, then find "
        "lookalikes by image, stored id or vector.\n\n"
        "Start with:  lookalike demo ./demo  (writes a demo collection of real photos and "
        "prints the next commands)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
listing_app = typer.Typer(
    help="Read and set live listing attributes (stock_level, ...).", no_args_is_help=True
)
app.add_typer(listing_app, name="listing")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

EXIT_ERROR = 1
EXIT_PARTIAL = 3

CatalogOpt = Annotated[
    str,
    typer.Option(
        "--catalog",
        "-c",
        envvar="LOOKALIKE_CATALOG",
        help="Catalog folder (created on first index). Env: LOOKALIKE_CATALOG.",
    ),
]


class OutputFormat(StrEnum):
    """Output formats."""

    table = "table"
    json = "json"


class GroupBy(StrEnum):
    """Group keys."""

    listing = "listing"


class Agg(StrEnum):
    """Per-listing aggregations."""

    max = "max"
    mean = "mean"
    sum_top_n = "sum-top-n"


FormatOpt = Annotated[
    OutputFormat, typer.Option("--format", "-f", help="table (for people) or json (for programs).")
]


ProgressOpt = Annotated[bool, typer.Option(help="Show a progress bar (stderr).")]
CellsOpt = Annotated[
    int | None,
    typer.Option(
        "--nprobe",
        help="With --index ivf/ivfpq: neighbouring cells each IVF cell is joined with (default "
        "16; more finds more pairs, slower).",
    ),
]


def _join_index_opt(what: str) -> Any:
    """``--index`` of the all-pairs analytics (dedup, kNN outliers)."""
    return typer.Option(
        "--index",
        help=f"exact (default: every pair, O(n^2)) or a built IVF index (`lookalike ann build "
        f"--kind ivf`): a blocked cell join, far faster on millions of images; {what}.",
    )


def _fail(exc: Exception) -> typer.Exit:
    err.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
    return typer.Exit(EXIT_ERROR)


def _open(
    catalog: str,
    extractor: str | None = None,
    device: str = "auto",
    create: bool = False,
    engine: str | None = None,
):
    from .catalog import open_catalog

    return open_catalog(catalog, extractor=extractor, device=device, create=create, engine=engine)


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.ERROR,
        format="%(levelname)s %(name)s: %(message)s",
    )


@app.command()
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
            help="Extractor for a new catalog: cnn (EfficientNet-Lite0, 1280-d), hog (1764-d), "
            "colorhist (512-d). An existing catalog keeps its own."
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
    device: Annotated[
        str,
        typer.Option(
            help="cnn inference: auto (GPU if present, else ONNX Runtime CPU), cpu, cuda."
        ),
    ] = "auto",
    failed_csv: Annotated[
        Path | None, typer.Option(help="Write failed files as CSV (location,reason).")
    ] = None,
    progress: ProgressOpt = True,
    fmt: FormatOpt = OutputFormat.table,
) -> None:
    """Extract feature vectors from images and store them in the catalog.

    Idempotent: images already stored with the same bytes are skipped, so re-running the same
    command adds nothing and an interrupted run resumes. A file that cannot be decoded is
    reported and skipped; the exit code is 3 if any failed.
    """
    try:
        cat = _open(catalog, extractor or None, device, create=True)
        with cat:
            report = cat.index(inputs, workers=workers, batch_size=batch_size, progress=progress)
    except KeyboardInterrupt:
        err.print("interrupted: committed batches are kept; run the same command to resume")
        raise typer.Exit(130) from None
    except LookalikeError as exc:
        raise _fail(exc) from None
    if failed_csv:
        with open(failed_csv, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["location", "reason"])
            writer.writerows(report.failed)
    for _, reason in report.failed[:20]:
        err.print(f"failed: {reason}", highlight=False, markup=False)
    if len(report.failed) > 20:
        err.print(f"... and {len(report.failed) - 20} more", highlight=False)
    if fmt == OutputFormat.json:
        _print_json(
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
        out.print(report.summary(), highlight=False)
    if report.failed:
        raise typer.Exit(EXIT_PARTIAL)


@app.command()
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
        Path | None, typer.Option(help="Search by a vector: a .npy file of shape (d,) or (n, d).")
    ] = None,
    k: Annotated[
        int | None,
        typer.Option("-k", "--k", help="Number of hits (default 10; unlimited with --threshold)."),
    ] = None,
    group_by: Annotated[
        GroupBy | None, typer.Option(help="listing: one hit per listing, scored by --agg.")
    ] = None,
    agg: Annotated[
        Agg,
        typer.Option(
            help="Per-listing score: max, mean, or sum-top-n (sum of the --top-n best images)."
        ),
    ] = Agg.max,
    top_n: Annotated[int, typer.Option(help="n of sum-top-n.")] = 3,
    threshold: Annotated[
        float | None,
        typer.Option(help="Only hits with score > THRESHOLD (score = cosine, in [-1, 1])."),
    ] = None,
    where: Annotated[
        str | None,
        typer.Option(
            help="Filter on listing attributes, e.g. \"stock_level > 0 and category = 'vehicle'\"."
        ),
    ] = None,
    save: Annotated[
        bool, typer.Option(help="Write the hits to query_results under the printed query_id.")
    ] = False,
    index: Annotated[
        str | None,
        typer.Option(
            help="exact, ivf, ivfpq, hnsw, or auto (ANN once built and the collection is "
            "large; the catalog's `config --index` setting)."
        ),
    ] = None,
    engine: Annotated[
        str | None,
        typer.Option(
            help="Exact engine: auto (default), fast (compiled kernels), numpy, torch (GPU). "
            "Env: LOOKALIKE_ENGINE."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="cnn inference device: auto, cpu, cuda.")] = "auto",
    fmt: FormatOpt = OutputFormat.table,
) -> None:
    """Find the images (or listings) most like a query: exact inner product over every vector.

    Examples:

      lookalike search query.jpg -c ./cat -k 5 --group-by listing

      lookalike search --id chelsea/chelsea-01.jpg -c ./cat --threshold 0.8

      lookalike search q.jpg -c ./cat --where "stock_level > 0" --save --format json
    """
    try:
        with _open(catalog, device=device, engine=engine) as cat:
            vec = np.load(vector) if vector is not None else None
            options = dict(
                k=k,
                group_by=group_by.value if group_by else None,
                agg=agg.value,
                top_n=top_n,
                threshold=threshold,
                where=where,
                save=save,
                index=index,
            )
            if vec is not None and vec.ndim == 2:
                results = cat.search_batch(vec, **options)
            else:
                results = [
                    cat.search(query, image_id=image_id, listing_id=listing, vector=vec, **options)
                ]
    except (LookalikeError, OSError, ValueError) as exc:
        raise _fail(exc) from None
    if fmt == OutputFormat.json:
        for res in results:
            _print_json(res.to_dict())
        return
    for res in results:
        table = Table(
            title=f"query {res.query_id}" + (" (saved)" if res.saved else ""), title_justify="left"
        )
        table.add_column("rank", justify="right")
        table.add_column("score", justify="right")
        table.add_column("listing_id")
        table.add_column("image_id")
        if group_by:
            table.add_column("images", justify="right")
        for h in res.hits:
            row = [str(h.rank), f"{h.score:.4f}", h.listing_id, h.image_id]
            if group_by:
                row.append(str(h.n_images))
            table.add_row(*row)
        out.print(table)
        if not res.hits:
            out.print("no hits")


@app.command()
def stats(catalog: CatalogOpt, fmt: FormatOpt = OutputFormat.table) -> None:
    """Catalog facts: model, number of images and listings, engine memory."""
    try:
        with _open(catalog) as cat:
            facts = cat.stats()
    except LookalikeError as exc:
        raise _fail(exc) from None
    if fmt == OutputFormat.json:
        _print_json(facts)
        return
    for key, value in facts.items():
        if key == "cache_bytes":
            value = f"{value} ({value / 2**20:.1f} MiB)"
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        out.print(f"{key:>12}: {value}", highlight=False)


@app.command()
def delete(
    image_id: Annotated[str, typer.Argument(help="Stored image id to delete.")],
    catalog: CatalogOpt,
    listing: Annotated[str | None, typer.Option(help="Listing, if the id is ambiguous.")] = None,
) -> None:
    """Delete a stored image (the next search no longer returns it)."""
    try:
        with _open(catalog) as cat:
            n = cat.delete(image_id, listing)
    except LookalikeError as exc:
        raise _fail(exc) from None
    if n == 0:
        err.print(f"error: no image {image_id!r}", highlight=False)
        raise typer.Exit(EXIT_ERROR)
    out.print(f"deleted {n} image(s)")


@app.command()
def results(
    query_id: Annotated[str, typer.Argument(help="A query_id printed by search --save.")],
    catalog: CatalogOpt,
    fmt: FormatOpt = OutputFormat.table,
) -> None:
    """Show the hits a search saved with --save."""
    try:
        with _open(catalog) as cat:
            result = cat.saved_results(query_id)
    except LookalikeError as exc:
        raise _fail(exc) from None
    hits = [h.to_dict() for h in result.hits]
    if fmt == OutputFormat.json:
        _print_json(result.to_dict())
        return
    for h in hits:
        out.print(
            f"{h['rank']:>4}  {h['score']:.4f}  {h['listing_id']}  {h['image_id']}", highlight=False
        )


@app.command()
def config(
    catalog: CatalogOpt,
    codes: Annotated[
        str | None,
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
        str | None,
        typer.Option(help="Default of search --index: auto, exact, ivf, ivfpq, hnsw."),
    ] = None,
) -> None:
    """Show or change the catalog's search settings (stored in the catalog)."""
    try:
        with _open(catalog) as cat:
            settings = cat.configure(codes=codes, rerank=rerank, index=index)
    except LookalikeError as exc:
        raise _fail(exc) from None
    for key, value in settings.items():
        out.print(f"{key:>8}: {value}", highlight=False)


ann_app = typer.Typer(help="Approximate nearest-neighbour indexes (faiss).", no_args_is_help=True)
app.add_typer(ann_app, name="ann")


@ann_app.command("build")
def ann_build(
    catalog: CatalogOpt,
    kind: Annotated[str, typer.Option(help="hnsw (default), ivf, or ivfpq.")] = "hnsw",
    nlist: Annotated[int, typer.Option(help="IVF cells (0: min(4 sqrt(n), n/39)).")] = 0,
    nprobe: Annotated[int, typer.Option(help="IVF cells scanned per query (0: nlist/8).")] = 0,
    pq_m: Annotated[int, typer.Option(help="IVF-PQ sub-quantizers (0: min(64, d/4)).")] = 0,
    hnsw_m: Annotated[int, typer.Option(help="HNSW links per node.")] = 32,
    ef_search: Annotated[int, typer.Option(help="HNSW search breadth.")] = 256,
) -> None:
    """Train and fill an ANN index of the catalog and save it in CATALOG/ann.

    Searches use it with --index KIND (or automatically once the collection is large); it
    follows later inserts and deletes. `lookalike bench` reports its recall@10.
    """
    try:
        with _open(catalog) as cat:
            ann = cat.build_index(
                kind, nlist=nlist, nprobe=nprobe, pq_m=pq_m, hnsw_m=hnsw_m, ef_search=ef_search
            )
    except LookalikeError as exc:
        raise _fail(exc) from None
    out.print(
        f"built {kind} over {ann.ntotal} vectors in {ann.build_seconds:.1f} s "
        f"({ann.params.factory(ann.dim)}); saved in {catalog}/ann",
        highlight=False,
    )


@app.command()
def bench(
    catalog: CatalogOpt,
    queries: Annotated[int, typer.Option(help="Stored vectors used as queries.")] = 100,
    k: Annotated[int, typer.Option("-k", "--k", help="Hits per query.")] = 10,
    fmt: FormatOpt = OutputFormat.table,
) -> None:
    """Latency (p50/p99) and recall@k of every engine and built ANN index on this catalog."""
    from .bench import bench_catalog

    try:
        with _open(catalog) as cat:
            rows = bench_catalog(cat, n_queries=queries, k=k)
    except LookalikeError as exc:
        raise _fail(exc) from None
    if fmt == OutputFormat.json:
        for row in rows:
            _print_json(row)
        return
    table = Table(
        title=f"{rows[0]['n']} vectors, d={rows[0]['d']}, {rows[0]['queries']} queries",
        title_justify="left",
    )
    for col in ("engine", "p50 ms", "p99 ms", f"recall@{k}"):
        table.add_column(col, justify="left" if col == "engine" else "right")
    for r in rows:
        table.add_row(
            r["name"], f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['recall_at_k']:.4f}"
        )
    out.print(table)


@listing_app.command("set")
def listing_set(
    listing_id: Annotated[str, typer.Argument(help="The listing.")],
    assignments: Annotated[
        list[str],
        typer.Argument(
            help="key=value pairs, e.g. stock_level=0 color=red (value null removes the key)."
        ),
    ],
    catalog: CatalogOpt,
) -> None:
    """Set live attributes of a listing; searches with --where see them at once."""
    attrs = {}
    for item in assignments:
        if "=" not in item:
            err.print(f"error: {item!r} is not key=value", highlight=False)
            raise typer.Exit(2)
        key, value = item.split("=", 1)
        attrs[key.strip()] = parse_value(value)
    try:
        with _open(catalog, create=True) as cat:
            cat.update_listing(listing_id, **attrs)
    except LookalikeError as exc:
        raise _fail(exc) from None


@listing_app.command("show")
def listing_show(
    listing_id: Annotated[str, typer.Argument(help="The listing.")],
    catalog: CatalogOpt,
) -> None:
    """Print a listing's attributes as JSON."""
    try:
        with _open(catalog) as cat:
            rec = cat.get_listing(listing_id)
    except LookalikeError as exc:
        raise _fail(exc) from None
    _print_json({"listing_id": rec.listing_id, **rec.attrs})


@listing_app.command("import")
def listing_import(
    csv_file: Annotated[
        Path,
        typer.Argument(help="CSV with a listing_id column; every other column is an attribute."),
    ],
    catalog: CatalogOpt,
) -> None:
    """Set listing attributes from a CSV file (numbers and true/false are parsed)."""
    try:
        with open(csv_file, newline="", encoding="utf-8") as fh, _open(catalog, create=True) as cat:
            reader = csv.DictReader(fh)
            if "listing_id" not in (reader.fieldnames or []):
                raise LookalikeError(f"{csv_file}: no listing_id column")
            n = 0
            for i, row in enumerate(reader, start=1):
                lid = (row.pop("listing_id") or "").strip()
                if not lid:
                    raise LookalikeError(f"{csv_file}: row {i}: empty listing_id")
                cat.update_listing(lid, **{k: parse_value(v or "") for k, v in row.items()})
                n += 1
    except (LookalikeError, OSError) as exc:
        raise _fail(exc) from None
    out.print(f"updated {n} listing(s)")


@app.command()
def stream(
    catalog: CatalogOpt,
    nats: Annotated[str, typer.Option(help="NATS server URL.", envvar="LOOKALIKE_NATS")] = (
        "nats://127.0.0.1:4222"
    ),
    subject: Annotated[str, typer.Option(help="Subject filter to consume.")] = "images.>",
    stream_name: Annotated[
        str, typer.Option("--stream", help="JetStream stream (created if missing).")
    ] = "LOOKALIKE",
    durable: Annotated[
        str, typer.Option(help="Durable consumer name; consumers sharing it share the load.")
    ] = "lookalike",
    batch_size: Annotated[int, typer.Option(help="Messages per fetch and per write.")] = 32,
    max_in_flight: Annotated[
        int, typer.Option(help="Most unacknowledged messages held at once.")
    ] = 64,
    dead_letter: Annotated[
        str, typer.Option(help="Subject for bad messages (kept in stream <stream>_DEAD).")
    ] = "lookalike.dead",
    ack_wait: Annotated[
        float, typer.Option(help="Seconds before the broker redelivers an unacked message.")
    ] = 30.0,
    max_payload: Annotated[int, typer.Option(help="Largest image payload, bytes.")] = 8 * 2**20,
    idle_exit: Annotated[
        float | None, typer.Option(help="Exit after this many seconds without messages.")
    ] = None,
    fmt: FormatOpt = OutputFormat.table,
) -> None:
    """Consume images, listing updates and deletes from NATS JetStream into the catalog.

    At-least-once delivery + idempotent writes: nothing lost, nothing duplicated across
    consumer crashes, broker restarts and redelivery. Bad messages go to --dead-letter with a
    reason. SIGTERM / Ctrl-C finishes the batch in hand, then exits. Counts are printed every
    10 s (stderr) and at exit.
    """
    import asyncio
    import signal
    import time

    from .stream.jetstream import StreamIngest

    try:
        cat = _open(catalog, create=True)
    except LookalikeError as exc:
        raise _fail(exc) from None
    last = [time.monotonic()]

    def progress(counts) -> None:
        if time.monotonic() - last[0] > 10:
            last[0] = time.monotonic()
            err.print(f"stream: {counts.as_dict()}", highlight=False)

    ingest = StreamIngest(
        cat,
        url=nats,
        subject=subject,
        stream=stream_name,
        durable=durable,
        batch_size=batch_size,
        max_in_flight=max_in_flight,
        dead_letter=dead_letter,
        ack_wait=ack_wait,
        max_payload=max_payload,
        on_batch=progress,
    )

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await ingest.run(stop, idle_exit=idle_exit)

    try:
        asyncio.run(main())
    except LookalikeError as exc:
        raise _fail(exc) from None
    finally:
        cat.close()
    counts = ingest.counts.as_dict()
    if fmt == OutputFormat.json:
        _print_json(counts)
    else:
        out.print(", ".join(f"{k} {v}" for k, v in counts.items()), highlight=False)


@app.command()
def publish(
    paths: Annotated[
        list[str] | None,
        typer.Argument(help="Image files, folders, list files or manifests (keys as in index)."),
    ] = None,
    nats: Annotated[str, typer.Option(help="NATS server URL.", envvar="LOOKALIKE_NATS")] = (
        "nats://127.0.0.1:4222"
    ),
    subject: Annotated[str, typer.Option(help="Subject to publish to.")] = "images.in",
    stream_name: Annotated[str, typer.Option("--stream", help="JetStream stream.")] = "LOOKALIKE",
    listing: Annotated[
        str | None, typer.Option(help="Listing id (overrides the folder convention).")
    ] = None,
    image_id: Annotated[str | None, typer.Option(help="Image id (single file only).")] = None,
    attr: Annotated[
        list[str] | None, typer.Option(help="Listing attribute key=value (repeatable).")
    ] = None,
    delete: Annotated[
        str | None, typer.Option(help="Publish a delete of this image id (with --listing).")
    ] = None,
) -> None:
    """Publish images (or a listing update, or a delete) to NATS JetStream for `lookalike stream`.

    Examples:

      lookalike publish ./photos --subject images.in

      lookalike publish --listing truck-17 --attr stock_level=0

      lookalike publish --delete truck-17/front.jpg --listing truck-17
    """
    from .stream.jetstream import publish_event, publish_images

    attrs = {}
    for item in attr or []:
        if "=" not in item:
            err.print(f"error: --attr {item!r} is not key=value", highlight=False)
            raise typer.Exit(2)
        key, value = item.split("=", 1)
        attrs[key.strip()] = parse_value(value)
    try:
        if delete:
            if not listing:
                raise LookalikeError("--delete needs --listing")
            n = publish_event(nats, subject, "delete", listing, delete, stream=stream_name)
        elif paths:
            n = publish_images(
                nats,
                subject,
                paths,
                attrs=attrs or None,
                listing_id=listing,
                image_id=image_id,
                stream=stream_name,
            )
        elif listing and attrs:
            n = publish_event(nats, subject, "listing", listing, attrs=attrs, stream=stream_name)
        else:
            raise LookalikeError("give image paths, or --listing with --attr, or --delete")
    except (LookalikeError, OSError, ValueError) as exc:
        raise _fail(exc) from None
    out.print(f"published {n} message(s) to {subject}", highlight=False)


@app.command()
def serve(
    catalog: CatalogOpt,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="LOOKALIKE_TOKEN",
            help="Bearer token required by POST /images, DELETE /images, PUT /listings.",
        ),
    ] = None,
    max_upload: Annotated[int, typer.Option(help="Largest upload, bytes.")] = 16 * 2**20,
    engine: Annotated[str | None, typer.Option(help="Exact engine (see search --engine).")] = None,
) -> None:
    """Serve the HTTP API (OpenAPI at /docs) and the web page at / (search by upload, results
    grouped by listing, an Explore map of the collection)."""
    import uvicorn

    from .server import create_app

    try:
        cat = _open(catalog, create=True, engine=engine)
    except LookalikeError as exc:
        raise _fail(exc) from None
    app_ = create_app(cat, token=token, max_upload=max_upload)
    err.print(
        f"lookalike: serving {catalog} on http://{host}:{port}/"
        + (" (writes need the bearer token)" if token else ""),
        highlight=False,
    )
    try:
        uvicorn.run(app_, host=host, port=port, log_level="warning")
    finally:
        cat.close()


@app.command("export")
def export_(
    catalog: CatalogOpt,
    parquet: Annotated[Path, typer.Option(help="Folder to write the lake tables into.")],
    parts: Annotated[int, typer.Option(help="Partitions of features (hash of listing_id).")] = 16,
) -> None:
    """Write the catalog as Parquet tables (features partitioned by a hash of listing_id,
    listings, query_results): the input of the Spark jobs and any other engine."""
    from .lake import export_catalog

    try:
        with _open(catalog) as cat:
            counts = export_catalog(cat, parquet, parts=parts)
    except LookalikeError as exc:
        raise _fail(exc) from None
    out.print(f"exported {counts} to {parquet}", highlight=False)


@app.command("import")
def import_(
    parquet: Annotated[Path, typer.Option(help="A lake folder (export or spark extract).")],
    catalog: CatalogOpt,
) -> None:
    """Read lake tables (from `lookalike export` or `lookalike spark extract`) into a catalog."""
    from .lake import import_catalog

    try:
        with _open(catalog, create=True) as cat:
            counts = import_catalog(parquet, cat)
    except LookalikeError as exc:
        raise _fail(exc) from None
    out.print(f"imported {counts} into {catalog}", highlight=False)


spark_app = typer.Typer(
    help="The same jobs on Apache Spark (pip install 'lookalike[spark]'; Java 17).",
    no_args_is_help=True,
)
app.add_typer(spark_app, name="spark")
MasterOpt = Annotated[
    str, typer.Option(help="Spark master: local[*], spark://host:7077, yarn, k8s://...")
]


@spark_app.command("extract")
def spark_extract(
    input_: Annotated[
        str, typer.Option("--input", help="Manifest (.parquet/.csv) with listing_id,image_id,path.")
    ],
    out_dir: Annotated[str, typer.Option("--out", help="Lake folder to write.")],
    extractor: Annotated[str, typer.Option(help="cnn, hog or colorhist.")] = "cnn",
    parts: Annotated[
        int, typer.Option(min=1, help="Partitions of features (hash of listing_id); also tasks.")
    ] = 16,
    master: MasterOpt = "local[*]",
) -> None:
    """Extract feature vectors on Spark executors; failed images land in an error column."""
    from . import spark as lsp

    try:
        counts = lsp.extract(lsp.session(master), input_, out_dir, extractor=extractor,
                             parts=parts)
    except LookalikeError as exc:
        raise _fail(exc) from None
    out.print(
        f"extracted {counts['images'] - counts['failed']} images into {out_dir} "
        f"({counts['failed']} failed: see the error column)",
        highlight=False,
    )


@spark_app.command("search")
def spark_search(
    features: Annotated[str, typer.Option(help="Lake folder (from export or spark extract).")],
    query: Annotated[
        str | None, typer.Argument(help="Query image (embedded on the driver).")
    ] = None,
    vector: Annotated[
        Path | None, typer.Option(help="Query vector(s): .npy (d,) or (n, d).")
    ] = None,
    queries: Annotated[
        str | None,
        typer.Option(
            help="Batch: a query table (.parquet/.csv) with query_id and a vector or path "
            "column; with --save, the results table keeps its query ids."
        ),
    ] = None,
    listings: Annotated[
        str | None, typer.Option(help="Listings table (default: in the lake).")
    ] = None,
    k: Annotated[int | None, typer.Option("-k", "--k", help="Hits (default 10).")] = None,
    group_by: Annotated[GroupBy | None, typer.Option(help="listing: one hit per listing.")] = None,
    agg: Annotated[Agg, typer.Option(help="max, mean or sum-top-n.")] = Agg.max,
    top_n: Annotated[int, typer.Option(help="n of sum-top-n.")] = 3,
    threshold: Annotated[float | None, typer.Option(help="Only hits with score > T.")] = None,
    where: Annotated[str | None, typer.Option(help="Filter on listing attributes.")] = None,
    save: Annotated[str | None, typer.Option(help="Write query_results Parquet here.")] = None,
    master: MasterOpt = "local[*]",
    fmt: FormatOpt = OutputFormat.table,
) -> None:
    """Exact search on Spark: same options and the same JSON as `lookalike search`."""
    from . import spark as lsp
    from .extract import get_extractor
    from .lake import read_model

    try:
        if sum(x is not None for x in (query, vector, queries)) != 1:
            raise LookalikeError("give one of: a query image, --vector, --queries")
        lake = features if not features.endswith("features") else str(Path(features).parent)
        ids = None
        if vector is not None:
            q = np.load(vector)
        elif queries is not None:
            ids, q = lsp.read_query_table(queries, get_extractor(read_model(lake).name))
        else:
            ext = get_extractor(read_model(lake).name)
            from .images import load_image

            q = ext.embed_images([load_image(query, draft_size=ext.draft_size).image])[0]
        results = lsp.search(
            lsp.session(master),
            features,
            q,
            k=k,
            group_by=group_by.value if group_by else None,
            agg=agg.value,
            top_n=top_n,
            threshold=threshold,
            where=where,
            listings=listings,
            save=save,
            query_ids=ids,
        )
    except (LookalikeError, OSError, ValueError) as exc:
        raise _fail(exc) from None
    for res in results:
        if fmt == OutputFormat.json:
            _print_json(res.to_dict())
        else:
            for h in res.hits:
                out.print(
                    f"{h.rank:>4}  {h.score:.4f}  {h.listing_id}  {h.image_id}", highlight=False
                )


@spark_app.command("cluster")
def spark_cluster(
    features: Annotated[str, typer.Option(help="Lake folder.")],
    k: Annotated[int, typer.Option("-k", "--k", help="Clusters.")],
    master: MasterOpt = "local[*]",
) -> None:
    """k-means with Spark MLlib (cosine distance); prints the cluster sizes."""
    from . import spark as lsp

    result = lsp.kmeans(lsp.session(master), features, k=k)
    _print_json(
        {"k": result["k"], "sizes": {str(c): int(n) for c, n in sorted(result["sizes"].items())}}
    )


@spark_app.command("train")
def spark_train(
    features: Annotated[str, typer.Option(help="Lake folder (labels: listing ids).")],
    model: Annotated[str, typer.Option(help="logreg or mlp.")] = "logreg",
    master: MasterOpt = "local[*]",
) -> None:
    """Train an MLlib classifier with TrainValidationSplit + ParamGridBuilder."""
    from . import spark as lsp

    _print_json(lsp.train_classifier(lsp.session(master), features, model=model))


@app.command()
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
    from .demo import write_demo

    counts = write_demo(folder, images_per_listing, queries_per_listing, seed)
    out.print(
        f"wrote {counts['images']} images in {counts['listings']} listings to {folder}/photos, "
        f"{counts['queries']} queries to {folder}/queries. Next:\n"
        f"  lookalike index {folder}/photos --catalog {folder}/cat\n"
        f"  lookalike listing import {folder}/listings.csv --catalog {folder}/cat\n"
        f"  lookalike search {folder}/queries/chelsea/q-01.jpg --catalog {folder}/cat "
        "-k 5 --group-by listing",
        highlight=False,
    )


@app.command("eval")
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
    fmt: FormatOpt = OutputFormat.table,
) -> None:
    """Measure retrieval quality: top-1, precision@k, recall@k and mAP over labelled queries."""
    from .evaluate import evaluate, evaluate_baseline, query_set

    try:
        with _open(catalog) as cat:
            qs = query_set(queries)
            report = evaluate(cat, qs, k=k)
            name = cat.model.name if cat.model else "catalog"
            base = evaluate_baseline(cat, qs, baseline, k=k) if baseline else None
    except LookalikeError as exc:
        raise _fail(exc) from None
    d = report.to_dict()
    if fmt == OutputFormat.json:
        _print_json({**d, "baseline": {"extractor": baseline, **base.to_dict()}} if base else d)
        return
    table = Table(title=f"{d['n_queries']} queries, k={k}", title_justify="left")
    table.add_column("metric")
    table.add_column(name, justify="right")
    if base:
        table.add_column(f"{baseline} (baseline)", justify="right")
    for key in ("top1", "precision_at_k", "recall_at_k", "mAP"):
        row = [key, f"{d[key]:.4f}"]
        if base:
            row.append(f"{base.to_dict()[key]:.4f}")
        table.add_row(*row)
    out.print(table)


@app.command()
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
    fmt: FormatOpt = OutputFormat.table,
) -> None:
    """Train a classifier on the stored vectors; print held-out accuracy, macro precision /
    recall / F1 and the confusion matrix; save it in the catalog (used by `predict`, the
    stream and the HTTP API)."""
    from .recognize import labels_from
    from .recognize import train as train_classifier

    if bool(labels) == bool(label_from):
        err.print("error: give exactly one of --labels FILE and --label-from listing|parent")
        raise typer.Exit(2)
    try:
        with _open(catalog) as cat:
            lab = labels_from(cat, labels or label_from or "")
            _, report = train_classifier(cat, lab, model=model, grid=grid, test_size=test_size)
    except LookalikeError as exc:
        raise _fail(exc) from None
    d = report.to_dict()
    if fmt == OutputFormat.json:
        _print_json(d)
        return
    out.print(
        f"{model} on {d['n_train']} train / {d['n_test']} held-out images "
        f"({d['seconds']:.1f} s); params {d['params'] or 'default'}",
        highlight=False,
    )
    for key in ("accuracy", "macro_precision", "macro_recall", "macro_f1"):
        out.print(f"{key:>16}: {d[key]:.4f}", highlight=False)
    table = Table(
        title="confusion matrix (rows: true label, columns: predicted label number)",
        title_justify="left",
    )
    table.add_column("true label")
    for n in range(len(d["labels"])):
        table.add_column(str(n + 1), justify="right")
    for n, (label, row) in enumerate(zip(d["labels"], d["confusion"], strict=True)):
        table.add_row(f"{n + 1} {label}", *[str(v) if v else "." for v in row])
    out.print(table)


@app.command()
def predict(
    images: Annotated[list[str], typer.Argument(help="Image files or URLs.")],
    catalog: CatalogOpt,
    k: Annotated[int, typer.Option("-k", "--k", help="Labels per image.")] = 3,
    fmt: FormatOpt = OutputFormat.table,
) -> None:
    """Recognize images with the catalog's classifier: top-k labels with probabilities."""
    try:
        with _open(catalog) as cat:
            preds = cat.predict(images, k=k)
    except LookalikeError as exc:
        raise _fail(exc) from None
    for image, top in zip(images, preds, strict=True):
        if fmt == OutputFormat.json:
            _print_json(
                {
                    "image": image,
                    "predictions": [{"label": lab, "probability": round(p, 6)} for lab, p in top],
                }
            )
        else:
            out.print(f"{image}: " + ", ".join(f"{lab} {p:.3f}" for lab, p in top), highlight=False)


analyze_app = typer.Typer(
    help="Clusters, outliers and a 2-D map of the collection.", no_args_is_help=True
)
app.add_typer(analyze_app, name="analyze")


@analyze_app.command("clusters")
def analyze_clusters(
    catalog: CatalogOpt,
    k: Annotated[
        int | None, typer.Option("-k", "--k", help="Clusters (default: sqrt(n / 2)).")
    ] = None,
    fmt: FormatOpt = OutputFormat.table,
) -> None:
    """Spherical k-means (faiss) of the vectors; cluster and distance stored per image."""
    from .analytics import kmeans

    try:
        with _open(catalog) as cat:
            report = kmeans(cat, k=k)
    except LookalikeError as exc:
        raise _fail(exc) from None
    if fmt == OutputFormat.json:
        _print_json(report.to_dict())
        return
    table = Table(title=f"k = {report.k}", title_justify="left")
    for col in ("cluster", "size", "representative"):
        table.add_column(col, justify="right" if col != "representative" else "left")
    for c in report.clusters:
        table.add_row(str(c.id), str(c.size), c.representative)
    out.print(table)


@analyze_app.command("outliers")
def analyze_outliers(
    catalog: CatalogOpt,
    top: Annotated[int, typer.Option(help="How many to list.")] = 10,
    method: Annotated[
        str, typer.Option(help="knn (1 - mean cosine to the k nearest) or isolation-forest.")
    ] = "knn",
    k: Annotated[int, typer.Option("-k", "--k", help="Neighbours of the knn score.")] = 10,
    index: Annotated[str, _join_index_opt("the --top listed stay exact")] = "exact",
    nprobe: CellsOpt = None,
    progress: ProgressOpt = True,
    fmt: FormatOpt = OutputFormat.table,
) -> None:
    """Score every image by how unusual it is; the score is stored per image (the web page's
    Explore view rings the most unusual). knn: 1 - mean cosine to the k nearest images."""
    from .analytics import isolation_outliers, knn_outliers

    try:
        with _open(catalog) as cat:
            if method == "knn":
                report = knn_outliers(cat, k=k, index=index, nprobe=nprobe, top=top,
                                      progress=progress)
            elif method == "isolation-forest":
                report = isolation_outliers(cat)
            else:
                raise LookalikeError("method must be knn or isolation-forest")
    except LookalikeError as exc:
        raise _fail(exc) from None
    rows = report.top(top)
    if fmt == OutputFormat.json:
        _print_json(
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
        out.print(f"{sc:.4f}  {lid}  {iid}", highlight=False)


@analyze_app.command("map")
def analyze_map(
    catalog: CatalogOpt,
    png: Annotated[Path | None, typer.Option(help="Also draw the map into this PNG.")] = None,
    method: Annotated[str, typer.Option(help="pca, or umap when umap-learn is installed.")] = (
        "pca"
    ),
) -> None:
    """Compute the 2-D map of the collection (stored for the web page's Explore view)."""
    from .analytics import project, render_map_png

    try:
        with _open(catalog) as cat:
            keys, _, used = project(cat, method=method)
            drawn = render_map_png(str(png), cat) if png else None
    except LookalikeError as exc:
        raise _fail(exc) from None
    out.print(
        f"{used} map of {len(keys)} images stored"
        + (
            f"; drawn to {png} ({drawn['clusters']} clusters, "
            f"{drawn['outliers_marked']} outliers marked)"
            if drawn
            else ""
        ),
        highlight=False,
    )


@app.command()
def dedup(
    catalog: CatalogOpt,
    threshold: Annotated[
        float, typer.Option(help="Near-duplicates: images with score (cosine) > THRESHOLD.")
    ] = 0.95,
    exact: Annotated[bool, typer.Option(help="Identical files (SHA-256) instead.")] = False,
    index: Annotated[str, _join_index_opt("it may miss a pair, never invent one")] = "exact",
    nprobe: CellsOpt = None,
    progress: ProgressOpt = True,
    csv_out: Annotated[
        Path | None, typer.Option("--csv", help="Write group,listing_id,image_id rows here.")
    ] = None,
    fmt: FormatOpt = OutputFormat.table,
) -> None:
    """Find groups of near-duplicate (or identical) images: connected components of the
    score > threshold graph, from the engine's threshold search (no n x n matrix). On millions
    of images, build an IVF index first (`lookalike ann build --kind ivf`) and pass --index
    ivf: each cell of the index is then joined with its 16 nearest cells only (float32 block
    products, exact scores), a fraction of the all-pairs work."""
    from .analytics import exact_duplicates, near_duplicates

    try:
        with _open(catalog) as cat:
            groups = (
                exact_duplicates(cat)
                if exact
                else near_duplicates(cat, threshold=threshold, index=index, nprobe=nprobe,
                                     progress=progress)
            )
    except LookalikeError as exc:
        raise _fail(exc) from None
    if csv_out:
        with open(csv_out, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["group", "listing_id", "image_id"])
            for i, g in enumerate(groups):
                writer.writerows([i, lid, iid] for lid, iid in g)
    if fmt == OutputFormat.json:
        _print_json({"groups": [[iid for _, iid in g] for g in groups]})
        return
    out.print(
        f"{len(groups)} group(s) of {'identical' if exact else 'near-duplicate'} images",
        highlight=False,
    )
    for i, g in enumerate(groups[:50]):
        out.print(
            f"{i:>4}  ({len(g)})  "
            + ", ".join(iid for _, iid in g[:8])
            + (" ..." if len(g) > 8 else ""),
            highlight=False,
        )


@app.command()
def extractors(
    prepare: Annotated[
        bool,
        typer.Option(help="Build and verify the cnn ONNX file now (otherwise done on first use)."),
    ] = False,
) -> None:
    """List the available extractors (name, dimension, version)."""
    from .extract import available_extractors, get_extractor

    for name in available_extractors():
        info = get_extractor(name).info
        out.print(f"{name:>10}  d={info.dim:<5} {info.version}", highlight=False)
    if prepare:
        from .extract.cnn import export_onnx, onnx_path

        path = onnx_path()
        out.print(f"cnn ONNX: {export_onnx(path) if not path.exists() else path}", highlight=False)


def _reflow(doc: str) -> str:
    """A command docstring as ``--help`` should show it: typer keeps the single line breaks
    of every paragraph after the first, so join them; indented paragraphs (examples) stay."""
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(
        p if p.startswith((" ", "\b")) else " ".join(line.strip() for line in p.splitlines())
        for p in paragraphs
    )


for _group in (app, listing_app, ann_app, spark_app, analyze_app):
    for _command in _group.registered_commands:
        if _command.help is None and _command.callback is not None and _command.callback.__doc__:
            _command.help = _reflow(_command.callback.__doc__)


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
