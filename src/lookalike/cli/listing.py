"""Listing commands: ``listing set``, ``listing show`` and ``listing import`` (live listing
attributes such as ``stock_level``, which ``search --where`` filters on).

They are registered on :data:`listing_app`, mounted by :mod:`lookalike.cli` as ``listing``.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import SourceError
from ..values import parse_value
from .common import (
    KEY_VALUE_METAVAR,
    Assignment,
    CatalogOpt,
    as_attrs,
    command,
    key_value,
    opened,
    print_json,
    say,
)

listing_app = typer.Typer(
    help="Read and set live listing attributes (stock_level, ...).", no_args_is_help=True
)

#: CSV rows written per transaction by ``listing import``.
IMPORT_BATCH = 10_000


@command(listing_app, "set")
def listing_set(
    listing_id: Annotated[str, typer.Argument(help="The listing.")],
    assignments: Annotated[
        list[Assignment],
        typer.Argument(
            parser=key_value,
            metavar=f"{KEY_VALUE_METAVAR}...",
            help="key=value pairs, e.g. stock_level=0 color=red (numbers and true/false are "
            "parsed; value null removes the key).",
            show_default=False,
        ),
    ],
    catalog: CatalogOpt,
) -> None:
    """Set live attributes of a listing; searches with --where see them at once."""
    with opened(catalog, create=True) as cat:
        cat.update_listing(listing_id, **as_attrs(assignments))


@command(listing_app, "show")
def listing_show(
    listing_id: Annotated[str, typer.Argument(help="The listing.")],
    catalog: CatalogOpt,
) -> None:
    """Print a listing's attributes as JSON."""
    with opened(catalog) as cat:
        rec = cat.get_listing(listing_id)
    print_json({"listing_id": rec.listing_id, **rec.attrs})


@command(listing_app, "import")
def listing_import(
    csv_file: Annotated[
        Path,
        typer.Argument(help="CSV with a listing_id column; every other column is an attribute."),
    ],
    catalog: CatalogOpt,
) -> None:
    """Set listing attributes from a CSV file (numbers and true/false are parsed; an empty
    cell removes the attribute). Written 10,000 rows a transaction."""
    n = 0
    with open(csv_file, newline="", encoding="utf-8") as fh, opened(catalog, create=True) as cat:
        reader = csv.DictReader(fh)
        if "listing_id" not in (reader.fieldnames or []):
            raise SourceError(f"{csv_file}: no listing_id column")
        batch: dict[str, dict[str, Any]] = {}
        for i, row in enumerate(reader, start=1):
            lid = (row.pop("listing_id") or "").strip()
            if not lid:
                raise SourceError(f"{csv_file}: row {i}: empty listing_id")
            batch.pop(lid, None)  # every row names every column: the last one wins
            batch[lid] = {k: parse_value(v or "") for k, v in row.items()}
            if len(batch) == IMPORT_BATCH:
                n += cat.update_listings(batch)
                batch = {}
        n += cat.update_listings(batch)
    say(f"updated {n} listing(s)")
