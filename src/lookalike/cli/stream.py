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
from ..stream.jetstream import (
    DEFAULT_ACK_WAIT,
    DEFAULT_BATCH_SIZE,
    DEFAULT_DEAD_LETTER,
    DEFAULT_DURABLE,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_MAX_PAYLOAD,
    DEFAULT_PUBLISH_SUBJECT,
    DEFAULT_STREAM,
    DEFAULT_SUBJECT,
    DEFAULT_URL,
    StreamCounts,
    StreamIngest,
)
from .common import (
    KEY_VALUE_METAVAR,
    Assignment,
    CatalogOpt,
    FormatOpt,
    OutputFormat,
    as_attrs,
    command,
    key_value,
    opened,
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
    idle_exit: Annotated[
        float | None, typer.Option(help="Exit after this many seconds without messages.")
    ] = None,
    fmt: FormatOpt = OutputFormat.TABLE,
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

    last = [time.monotonic()]

    def progress(counts: StreamCounts) -> None:
        if time.monotonic() - last[0] > PROGRESS_EVERY_S:
            last[0] = time.monotonic()
            warn(f"stream: {counts.as_dict()}")

    with opened(catalog, create=True) as cat:
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

        async def consume() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            await ingest.run(stop, idle_exit=idle_exit)

        asyncio.run(consume())
    counts = ingest.counts.as_dict()
    if fmt == OutputFormat.JSON:
        print_json(counts)
    else:
        say(", ".join(f"{k} {v}" for k, v in counts.items()))


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

    Examples:

      lookalike publish ./photos --subject images.in

      lookalike publish --listing truck-17 --attr stock_level=0

      lookalike publish --delete truck-17/front.jpg --listing truck-17
    """
    from ..stream.jetstream import publish_event, publish_images

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
        )
    elif listing and attrs:
        n = publish_event(nats, subject, "listing", listing, attrs=attrs, stream=stream_name)
    else:
        raise LookalikeError("give image paths, or --listing with --attr, or --delete")
    say(f"published {n} message(s) to {subject}")
