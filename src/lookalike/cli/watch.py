"""Watchlist commands: ``watch add | list | remove | hits | relay`` (standing queries that every
image written to the catalog is compared with; see :mod:`lookalike.catalog.watch`).

Registered on :data:`watch_app`, mounted by :mod:`lookalike.cli` as ``watch``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..catalog import check_watch_name
from ..errors import NotFoundError, QueryError
from ..recognize.watch import add_to_watchlist
from ..stream.jetstream import DEFAULT_URL
from ..stream.recognition import WatchRelay, default_match_threshold
from .common import (
    CatalogOpt,
    FormatOpt,
    OutputFormat,
    command,
    opened,
    out,
    parse_threshold,
    print_json,
    say,
    warn,
)

if TYPE_CHECKING:
    from ..catalog import Catalog
    from ..types import Key

watch_app = typer.Typer(
    help="Watchlists: named sets of reference images, each with a threshold; every image "
    "written afterwards (index, stream, upload) that scores above it is recorded and "
    "published to lookalike.watch.<name>.",
    no_args_is_help=True,
)

NameArg = Annotated[str, typer.Argument(help="The watchlist (A-Z a-z 0-9 _ -, at most 64).")]


@command(watch_app, "add")
def watch_add(
    name: NameArg,
    catalog: CatalogOpt,
    images: Annotated[
        list[str] | None,
        typer.Argument(help="Image files, folders, list files or manifests (ids as in index)."),
    ] = None,
    threshold: Annotated[
        str,
        typer.Option(
            metavar="T|auto",
            help="Match when an image scores above T (a cosine); auto: the catalog's "
            "calibrated near-duplicate threshold, else the extractor's.",
        ),
    ] = "auto",
    stored: Annotated[
        list[str] | None,
        typer.Option(
            help="A stored image id to add (its vector; repeatable; LISTING/IMAGE_ID when the "
            "id is in several listings)."
        ),
    ] = None,
    fmt: FormatOpt = OutputFormat.TABLE,
) -> None:
    """Add reference images to a watchlist (created on first use). Takes effect at once, also
    in running consumers and servers: every image written from then on is compared with it.

    Examples:

      lookalike watch add stolen ./stolen-photos --threshold 0.9

      lookalike watch add reposts --stored truck-17/front.jpg
    """
    value = parse_threshold(threshold)
    check_watch_name(name)
    if not images and not stored:
        raise QueryError("give image files or folders, or --stored IMAGE_ID")
    why = ""
    with opened(catalog, create=True) as cat:
        if value is None:
            value, why = default_match_threshold(cat)
        keys = [_stored_key(cat, s) for s in stored or ()]
        entries = add_to_watchlist(cat, name, value, images or (), keys)
    if why:
        warn(f"threshold {value:.3f}: {why}")
    if fmt == OutputFormat.JSON:
        print_json({"name": name, "entries": [e.to_dict() for e in entries]})
    else:
        say(f"watchlist {name}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")


def _stored_key(cat: Catalog, text: str) -> Key:
    """The key of a stored image named by its image id (or ``listing/image`` when the image id
    alone is in several listings).

    Raises:
        NotFoundError: no such image. QueryError: the id is in several listings.
    """
    try:
        return cat.resolve_key(text)
    except (NotFoundError, QueryError):
        listing, _, image = text.partition("/")
        if image:
            try:
                return cat.resolve_key(image, listing)
            except NotFoundError:
                pass
        raise


@command(watch_app, "list")
def watch_list(
    catalog: CatalogOpt,
    name: Annotated[str | None, typer.Argument(help="One watchlist (default: all).")] = None,
    fmt: FormatOpt = OutputFormat.TABLE,
) -> None:
    """List the watchlists and their entries."""
    with opened(catalog) as cat:
        entries = cat.watch_entries(name)
    if fmt == OutputFormat.JSON:
        print_json([e.to_dict() for e in entries])
        return
    table = Table(title="watchlists", title_justify="left")
    for col in ("name", "entry_id", "threshold", "source"):
        table.add_column(col, justify="right" if col == "threshold" else "left")
    for e in entries:
        table.add_row(
            escape(e.name), escape(e.entry_id), f"{e.threshold:.3f}", escape(e.source or "")
        )
    out.print(table)
    if not entries:
        say("no watchlists")


@command(watch_app, "remove")
def watch_remove(
    name: NameArg,
    catalog: CatalogOpt,
    entry_id: Annotated[str | None, typer.Argument(help="One entry (default: all).")] = None,
) -> None:
    """Remove a watchlist, or one entry of it (recorded hits stay). Takes effect at once."""
    with opened(catalog) as cat:
        n = cat.watch_remove(name, entry_id)
    say(f"removed {n} entr{'y' if n == 1 else 'ies'} from watchlist {name}")


@command(watch_app, "hits")
def watch_hits(
    name: NameArg,
    catalog: CatalogOpt,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="Newest hits shown.")] = 20,
    fmt: FormatOpt = OutputFormat.TABLE,
) -> None:
    """The newest images that matched a watchlist, with the entry, score and whether the
    event was published yet."""
    with opened(catalog) as cat:
        rows = cat.watch_hits(name, limit)
    if fmt == OutputFormat.JSON:
        for r in rows:
            print_json(r.to_dict())
        return
    table = Table(title=f"hits of watchlist {escape(name)}", title_justify="left")
    for col in ("matched_at", "score", "listing_id", "image_id", "entry_id", "published"):
        table.add_column(col, justify="right" if col == "score" else "left")
    import datetime as dt

    for r in rows:
        when = dt.datetime.fromtimestamp(r.matched_at).isoformat(sep=" ", timespec="seconds")
        table.add_row(
            when,
            f"{r.score:.4f}",
            escape(r.listing_id),
            escape(r.image_id),
            escape(r.entry_id or ""),
            "yes" if r.published_at is not None else "no",
        )
    out.print(table)
    if not rows:
        say("no hits")


@command(watch_app, "relay")
def watch_relay(
    catalog: CatalogOpt,
    nats: Annotated[str, typer.Option(help="NATS server URL.", envvar="LOOKALIKE_NATS")] = (
        DEFAULT_URL
    ),
    interval: Annotated[
        float, typer.Option(min=0.05, help="Seconds between looks at the outbox.")
    ] = 0.5,
    once: Annotated[bool, typer.Option(help="Publish what is waiting, then exit.")] = False,
) -> None:
    """Publish the catalog's watchlist matches that are still in the outbox (written by index
    or serve, which have no NATS connection) to lookalike.watch.<name>, with Nats-Msg-Id =
    the event id, and mark them published. A running `lookalike stream` does this too; run
    the relay where no consumer runs. SIGTERM / Ctrl-C stops it."""
    import asyncio
    import signal

    with opened(catalog) as cat:
        relay = WatchRelay(cat, url=nats, interval=interval, notify=lambda t: warn(f"relay: {t}"))

        async def main() -> int:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            return await relay.run(stop, once=once)

        n = asyncio.run(main())
    say(
        f"published {n} watchlist event(s)"
        + (f", {relay.duplicates} duplicate(s)" if relay.duplicates else "")
    )
