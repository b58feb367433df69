"""Real-time ingest commands: ``stream`` (a durable NATS JetStream consumer writing into the
catalog) and ``publish`` (images, listing updates or deletes onto the stream).

The NATS defaults (server URL, stream, subject filter, durable name, dead-letter subject, payload
limit, and the consumer's batch, in-flight and ack-wait defaults) come from
:mod:`lookalike.stream.jetstream`, never from copies here. Registered on :data:`commands`
(merged into the top level).
"""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import LookalikeError
from ..recognize.watch import DEFAULT_MATCH_K, DEFAULT_MATCH_SUBJECT, ArrivalMatching
from ..stream.jetstream import (
    DEFAULT_ACK_WAIT,
    DEFAULT_BATCH_SIZE,
    DEFAULT_DEAD_LETTER,
    DEFAULT_DURABLE,
    DEFAULT_MAX_DELIVER,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_MAX_PAYLOAD,
    DEFAULT_PUBLISH_SUBJECT,
    DEFAULT_STREAM,
    DEFAULT_SUBJECT,
    DEFAULT_URL,
    StreamCounts,
    StreamIngest,
)
from ..stream.recognition import MatchStep, default_match_threshold
from .common import (
    EXIT_PARTIAL,
    KEY_VALUE_METAVAR,
    Assignment,
    CatalogOpt,
    FormatOpt,
    OutputFormat,
    as_attrs,
    command,
    key_value,
    opened,
    parse_threshold,
    print_json,
    say,
    warn,
)

commands = typer.Typer()

PROGRESS_EVERY_S = 10.0
"""Seconds between the consumer's progress lines on stderr."""

NatsOpt = Annotated[str, typer.Option(help="NATS server URL.", envvar="LOOKALIKE_NATS")]


@command(commands)
def stream(
    catalog: CatalogOpt,
    nats: NatsOpt = DEFAULT_URL,
    subject: Annotated[str, typer.Option(help="Subject filter to consume.")] = DEFAULT_SUBJECT,
    stream_name: Annotated[
        str, typer.Option("--stream", help="JetStream stream (created if missing).")
    ] = DEFAULT_STREAM,
    durable: Annotated[
        str, typer.Option(help="Durable consumer name; consumers sharing it share the load.")
    ] = DEFAULT_DURABLE,
    batch_size: Annotated[
        int, typer.Option(help="Messages per fetch and per write.")
    ] = DEFAULT_BATCH_SIZE,
    max_in_flight: Annotated[
        int, typer.Option(help="Most unacknowledged messages held at once.")
    ] = DEFAULT_MAX_IN_FLIGHT,
    dead_letter: Annotated[
        str, typer.Option(help="Subject for bad messages (kept in stream <stream>_DEAD).")
    ] = DEFAULT_DEAD_LETTER,
    ack_wait: Annotated[
        float, typer.Option(help="Seconds before the broker redelivers an unacked message.")
    ] = DEFAULT_ACK_WAIT,
    max_payload: Annotated[
        int, typer.Option(help="Largest image payload, bytes.")
    ] = DEFAULT_MAX_PAYLOAD,
    max_deliver: Annotated[
        int,
        typer.Option(
            help="Deliveries of a message whose write keeps failing before it is dead-lettered "
            "(the rest of its batch is written at once)."
        ),
    ] = DEFAULT_MAX_DELIVER,
    idle_exit: Annotated[
        float | None, typer.Option(help="Exit after this many seconds without messages.")
    ] = None,
    match: Annotated[
        bool,
        typer.Option(
            "--match",
            help="Match every arriving image against the catalog and publish an event per "
            "image with a hit above --match-threshold (implied by the other --match-* options).",
        ),
    ] = False,
    match_threshold: Annotated[
        str | None,
        typer.Option(
            metavar="T|auto",
            help="Match when a hit scores above T (a cosine); auto: the catalog's calibrated "
            "near-duplicate threshold, else the extractor's.",
        ),
    ] = None,
    match_k: Annotated[int, typer.Option(min=1, max=1000, help="Hits per event.")] = (
        DEFAULT_MATCH_K
    ),
    match_where: Annotated[
        str | None, typer.Option(help='Only hits whose listing passes, e.g. "stock_level > 0".')
    ] = None,
    match_subject: Annotated[
        str, typer.Option(help="Subject of the match events (kept in stream LOOKALIKE_MATCHES).")
    ] = DEFAULT_MATCH_SUBJECT,
    match_only: Annotated[
        bool,
        typer.Option(
            help="Match without storing: images are embedded, matched and forgotten; listing "
            "updates and deletes are acknowledged and ignored."
        ),
    ] = False,
    match_own_listing: Annotated[
        bool, typer.Option(help="Report hits in the image's own listing too.")
    ] = False,
    relay: Annotated[
        bool,
        typer.Option(
            help="Publish the catalog's watchlist matches (the outbox) to lookalike.watch.<name>."
        ),
    ] = True,
    fmt: FormatOpt = OutputFormat.TABLE,
) -> None:
    """Consume images, listing updates and deletes from NATS JetStream into the catalog.

    At-least-once delivery + idempotent writes: nothing lost, nothing duplicated across
    consumer crashes, broker restarts and redelivery. Bad messages go to --dead-letter with a
    reason; a message whose write keeps failing is retried --max-deliver times, then
    dead-lettered, without holding up the others. SIGTERM / Ctrl-C finishes the batch in hand,
    then exits. On stderr: one line at start, counts every 10 s, one line per dead letter and
    per connection event; counts again at exit.

    With --match (or any --match-* option) every arriving image is searched against the
    catalog (itself and, unless --match-own-listing, its own listing excluded) and each image
    with a hit above the threshold gives one JSON event on --match-subject, published before
    the image is acknowledged, with Nats-Msg-Id derived from the image's key and SHA-256 (a
    redelivery is dropped as a duplicate). Watchlist matches (lookalike watch) are published
    to lookalike.watch.<name>.
    """
    import asyncio
    import signal

    matching = match or match_only or match_own_listing or match_threshold is not None
    matching = matching or match_where is not None or match_subject != DEFAULT_MATCH_SUBJECT
    threshold = parse_threshold(match_threshold) if match_threshold is not None else None
    with opened(catalog, create=True) as cat:
        _ = cat.extractor  # a catalog of another extractor version says so here, in one line
        step = None
        if matching:
            if threshold is None:
                threshold, why = default_match_threshold(cat)
                warn(f"stream: match threshold {threshold:.3f}: {why}")
            step = MatchStep(
                cat,
                ArrivalMatching(threshold, match_k, match_where, match_own_listing),
                subject=match_subject,
                match_only=match_only,
            )
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
            max_deliver=max_deliver,
            notify=lambda text: warn(f"stream: {text}"),
            match=step,
            relay=relay,
        )

        async def report_every(interval: float) -> None:
            while True:
                await asyncio.sleep(interval)
                warn(f"stream: {_counts_line(ingest.counts)}")

        async def consume() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            warn(
                f"stream: consuming {subject} from stream {stream_name} at {nats} as durable "
                f"{durable} into {cat.uri}; dead letters to {dead_letter}"
                + (f"; match events to {match_subject}" if step is not None else "")
            )
            reporter = asyncio.create_task(report_every(PROGRESS_EVERY_S))
            try:
                await ingest.run(stop, idle_exit=idle_exit)
            finally:
                reporter.cancel()

        asyncio.run(consume())
    counts = ingest.counts.as_dict()
    if fmt == OutputFormat.JSON:
        print_json(counts)
    else:
        say(_counts_line(ingest.counts))


def _counts_line(counts: StreamCounts) -> str:
    """``received 12, added 10, ...``: the consumer's counts on one line."""
    return ", ".join(f"{k} {v}" for k, v in counts.as_dict().items())


@command(commands)
def publish(
    paths: Annotated[
        list[str] | None,
        typer.Argument(help="Image files, folders, list files or manifests (keys as in index)."),
    ] = None,
    nats: NatsOpt = DEFAULT_URL,
    subject: Annotated[
        str, typer.Option(help="Subject to publish to (under the consumer's images.>).")
    ] = DEFAULT_PUBLISH_SUBJECT,
    stream_name: Annotated[
        str, typer.Option("--stream", help="JetStream stream (created if missing).")
    ] = DEFAULT_STREAM,
    listing: Annotated[
        str | None, typer.Option(help="Listing id (overrides the folder convention).")
    ] = None,
    image_id: Annotated[str | None, typer.Option(help="Image id (single file only).")] = None,
    attr: Annotated[
        list[Assignment] | None,
        typer.Option(
            parser=key_value,
            metavar=KEY_VALUE_METAVAR,
            help="Listing attribute key=value (repeatable; null removes the key). With image "
            "paths, sent with every image; with --listing alone, a listing update.",
        ),
    ] = None,
    delete: Annotated[
        str | None, typer.Option(help="Publish a delete of this image id (with --listing).")
    ] = None,
) -> None:
    """Publish images (or a listing update, or a delete) to NATS JetStream for `lookalike stream`.

    A file that cannot be sent (unreadable, or larger than the server's max_payload) is named
    on stderr with the reason and the rest are sent; the exit code is then 3, as for index.
    An unreachable server fails after 3 connect attempts (a few seconds).

    Examples:

      lookalike publish ./photos --subject images.in

      lookalike publish --listing truck-17 --attr stock_level=0

      lookalike publish --delete truck-17/front.jpg --listing truck-17
    """
    from ..stream.jetstream import publish_event, publish_images

    failed: list[tuple[str, str]] = []

    def report(what: str, reason: str) -> None:
        failed.append((what, reason))
        warn(f"failed: {what}: {reason}")

    attrs = as_attrs(attr)
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
            on_failure=report,
        )
    elif listing and attrs:
        n = publish_event(nats, subject, "listing", listing, attrs=attrs, stream=stream_name)
    else:
        raise LookalikeError("give image paths, or --listing with --attr, or --delete")
    say(f"published {n} message(s) to {subject}" + (f", {len(failed)} failed" if failed else ""))
    if failed:
        raise typer.Exit(EXIT_PARTIAL)
