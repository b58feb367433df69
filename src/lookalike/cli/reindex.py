"""The ``reindex`` command: re-extract a catalog's images with the installed extractor (or
another one) and switch it to the new model atomically (:meth:`lookalike.catalog.Catalog.
reindex` does the work; this module parses, reports and sets the exit code).

Registered on :data:`commands`, a typer app without a name that :mod:`lookalike.cli` merges
into the top level.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Annotated

import typer

from .common import (
    EXIT_PARTIAL,
    CatalogOpt,
    DeviceOpt,
    FormatOpt,
    OutputFormat,
    ProgressOpt,
    command,
    interrupted_exit,
    opened,
    print_json,
    say,
    term_as_interrupt,
    warn,
)

commands = typer.Typer()

#: Images that could not be reindexed listed on stderr (all of them go to ``--failed-csv``).
MISSING_SHOWN = 20


@command(commands)
def reindex(
    catalog: CatalogOpt,
    extractor: Annotated[
        str,
        typer.Option(
            help="Extractor to move to: the catalog's own by default (as this install makes "
            "it); another one (cnn, cnn-int8, hog, colorhist) migrates the catalog to it."
        ),
    ] = "",
    batch_size: Annotated[
        int, typer.Option(help="Images per model call and per committed batch.", min=1)
    ] = 32,
    workers: Annotated[
        int | None,
        typer.Option(help="Threads reading and decoding images (default: one per core; 0: none)."),
    ] = None,
    drop_missing: Annotated[
        bool,
        typer.Option(
            help="Switch even when some images cannot be re-extracted (their files are gone "
            "and their bytes not kept): they are deleted, and watchlist entries without a "
            "stored image are removed. Without it the catalog keeps its old vectors."
        ),
    ] = False,
    thumbnails: Annotated[
        bool,
        typer.Option(
            help="Re-extract an image whose source is gone from its stored thumbnail (<= 192 "
            "px, kept for uploads): close to, not equal to, a fresh index's vector."
        ),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            help="Only say what would be re-extracted and from where, and which images have "
            "no readable source (reads no image, changes nothing)."
        ),
    ] = False,
    failed_csv: Annotated[
        Path | None,
        typer.Option(help="Write the images that could not be reindexed as CSV (image,reason)."),
    ] = None,
    device: DeviceOpt = "auto",
    progress: ProgressOpt = True,
    fmt: FormatOpt = OutputFormat.TABLE,
) -> None:
    """Re-extract every stored image with the installed extractor and switch the catalog to
    its model in one step: what to run when an upgrade changed the extractor (search by
    image then says so), or with --extractor to move to another one (e.g. hog to cnn).

    Images are re-read from their recorded files or URLs (only if their bytes are unchanged),
    or from the bytes kept for images written during the reindex. The new vectors are written
    beside the old ones, in committed batches: searches keep answering from the old vectors
    until every image is done, then one transaction switches model and vectors (never a
    mix). Interrupted (Ctrl-C, SIGTERM, even kill -9), the same command continues where it
    stopped. Images written meanwhile are caught up before the switch. Afterwards the engine
    files and ANN indexes are rebuilt; the near-duplicate calibration, the analysis and a
    trained classifier belonged to the old vectors: the summary says what to re-run.

    An image that cannot be re-read is listed and counted, and the run goes on; the catalog
    then keeps its old vectors (exit 3) until you restore the files and run again (only they
    are redone), or pass --drop-missing.

    Examples:

      lookalike reindex --catalog ./cat --dry-run

      lookalike reindex --catalog ./cat

      lookalike reindex --catalog ./cat --extractor cnn    # migrate a hog catalog to cnn
    """
    import signal

    missing: list[tuple[str, str]] = []

    def note(image: str, reason: str) -> None:
        if len(missing) < MISSING_SHOWN:
            warn(f"not reindexed: {reason}")
        missing.append((image, reason))

    try:
        with term_as_interrupt() as received, opened(catalog, device=device) as cat:
            report = cat.reindex(
                extractor or None,
                batch_size=batch_size,
                workers=workers,
                drop_missing=drop_missing,
                thumbnails=thumbnails,
                dry_run=dry_run,
                progress=progress and fmt == OutputFormat.TABLE,
                on_failure=note,
            )
    except KeyboardInterrupt:
        code = interrupted_exit(received)
        warn(
            f"interrupted ({signal.Signals(code - 128).name}): the catalog still answers from "
            "its old vectors; the batches re-extracted so far are kept: run the same command "
            "to continue"
        )
        raise typer.Exit(code) from None
    if len(missing) > MISSING_SHOWN:
        warn(f"... and {len(missing) - MISSING_SHOWN} more not reindexed")
    if failed_csv:
        with open(failed_csv, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["image", "reason"])
            writer.writerows(report.missing)
    for entry in report.watch_missing[:MISSING_SHOWN]:
        warn(
            f"watchlist entry {entry}: made from an image file or a vector, it has no stored image"
        )
    if fmt == OutputFormat.JSON:
        print_json(report.to_dict())
    else:
        say(report.summary())
        for line in report.after:
            say(f"  {line}")
    if report.status == "incomplete" or (dry_run and (report.missing or report.watch_missing)):
        raise typer.Exit(EXIT_PARTIAL)
