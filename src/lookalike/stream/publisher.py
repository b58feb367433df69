"""Publishing to NATS JetStream (``lookalike publish``): image files, listing updates and
deletes, within the server's ``max_payload``, failing in bounded time when the server cannot
be reached."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BrokerError, ImageError, LookalikeError
from ..images import iter_sources, read_bytes, sha256_hex
from .connection import DEFAULT_STREAM, broker_error, connect, ensure_stream, stream_subject
from .messages import make_headers

log = logging.getLogger(__name__)

#: Connect attempts of ``lookalike publish`` before it gives up (the consumer retries forever).
PUBLISH_CONNECT_ATTEMPTS = 3
#: Seconds one connect attempt of ``lookalike publish`` may take.
PUBLISH_CONNECT_TIMEOUT = 2.0

#: Receives ``(what, reason)`` for a message that could not be published.
FailureCallback = Callable[[str, str], None]


@dataclass
class _Outgoing:
    """A message to publish; ``name`` is what a failure report names (a file, or
    ``listing/image``); ``error`` says why it cannot be sent (the file could not be read)."""

    name: str
    payload: bytes
    headers: dict[str, str]
    error: str = ""


def _headers_size(headers: dict[str, str]) -> int:
    """Bytes the headers take on the wire (``NATS/1.0`` block): they count against the
    server's ``max_payload`` together with the payload."""
    return len(b"NATS/1.0\r\n\r\n") + sum(
        len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items()
    )


async def _publish(
    url: str,
    subject: str,
    items: Iterable[_Outgoing],
    stream: str,
    on_failure: FailureCallback | None,
) -> int:
    """Publish ``items``; see :func:`publish`."""
    from nats.errors import MaxPayloadError

    try:
        nc = await connect(
            url,
            name=f"lookalike-publish-{os.getpid()}",
            attempts=PUBLISH_CONNECT_ATTEMPTS,
            timeout=PUBLISH_CONNECT_TIMEOUT,
            notify=lambda text: log.info("%s", text),
        )
    except Exception as exc:
        raise broker_error(exc, f"cannot connect to NATS at {url}") from None

    def failed(item: _Outgoing, reason: str) -> None:
        if on_failure is None:
            raise BrokerError(f"cannot publish {item.name}: {reason}")
        on_failure(item.name, reason)

    n = 0
    try:
        js = nc.jetstream()
        await ensure_stream(js, stream, [stream_subject(subject)])
        limit = int(nc.max_payload)  # the server's, from its INFO at connect
        for item in items:
            if item.error:
                failed(item, item.error)
                continue
            size = len(item.payload) + _headers_size(item.headers)
            if size > limit:  # the server would close the connection on it
                failed(
                    item,
                    f"{len(item.payload)} bytes (with headers {size}) is over the NATS "
                    f"server's max_payload of {limit} bytes",
                )
                continue
            try:
                await js.publish(subject, item.payload, headers=item.headers, timeout=30)
            except MaxPayloadError:
                failed(item, f"over the NATS server's max_payload of {limit} bytes")
                continue
            n += 1
    finally:
        await nc.close()  # every publish was acknowledged by JetStream
    return n


async def publish(
    url: str,
    subject: str,
    events: Iterable[tuple[bytes, dict[str, str]]],
    stream: str = DEFAULT_STREAM,
    on_failure: FailureCallback | None = None,
) -> int:
    """Publish ``(payload, headers)`` messages to JetStream, waiting for each broker ack.

    The server's ``max_payload`` is read at connect: a message over it (payload plus headers)
    is not sent. An unreachable server fails after :data:`PUBLISH_CONNECT_ATTEMPTS` attempts
    of at most :data:`PUBLISH_CONNECT_TIMEOUT` seconds each.

    Args:
        on_failure: receives ``(listing/image, reason)`` for a message that cannot be sent,
            and the rest are published; without it, the first such message raises.

    Returns:
        Messages published.

    Raises:
        BrokerError: the broker cannot be reached (or a message cannot be sent and there is
            no ``on_failure``).
    """
    items = (
        _Outgoing("/".join(x for x in (h.get("Listing-Id"), h.get("Image-Id")) if x), p, h)
        for p, h in events
    )
    return await _publish(url, subject, items, stream, on_failure)


def _image_messages(
    inputs: Sequence[str | os.PathLike[str]],
    attrs: dict[str, Any] | None = None,
    listing_id: str | None = None,
    image_id: str | None = None,
) -> Iterator[_Outgoing]:
    """Messages for image files; a file that cannot be read is an item with ``error`` set."""
    for src in iter_sources(list(inputs)):
        lid = listing_id or src.listing_id
        iid = image_id or src.image_id
        headers = make_headers("image", lid, iid, attrs)
        try:
            data = read_bytes(src.location)
        except LookalikeError as exc:
            yield _Outgoing(src.location, b"", headers, error=str(exc))
            continue
        headers["Nats-Msg-Id"] = f"{lid}/{iid}/{sha256_hex(data)}"
        yield _Outgoing(src.location, data, headers)


def image_events(
    inputs: Sequence[str | os.PathLike[str]],
    attrs: dict[str, Any] | None = None,
    listing_id: str | None = None,
    image_id: str | None = None,
) -> Iterable[tuple[bytes, dict[str, str]]]:
    """Messages for image files (keys by the folder convention of ``lookalike index``, or the
    given ids for a single file), each with a broker de-duplication id.

    Raises:
        ImageError: a file cannot be read.
    """
    for item in _image_messages(inputs, attrs, listing_id, image_id):
        if item.error:
            raise ImageError(item.error)
        yield item.payload, item.headers


def publish_images(
    url: str,
    subject: str,
    inputs: Sequence[str | os.PathLike[str] | Path],
    on_failure: FailureCallback | None = None,
    **kwargs: Any,
) -> int:
    """Synchronous wrapper: publish image files (see :func:`image_events`). Returns the count.

    Args:
        on_failure: receives ``(file, reason)`` for each file that cannot be sent (unreadable,
            or over the server's ``max_payload``), and the rest are published; without it,
            the first such file raises :class:`~lookalike.errors.BrokerError`.
    """
    stream = kwargs.pop("stream", DEFAULT_STREAM)
    items = _image_messages(inputs, **kwargs)
    return asyncio.run(_publish(url, subject, items, stream, on_failure))


def publish_event(
    url: str,
    subject: str,
    kind: str,
    listing_id: str,
    image_id: str | None = None,
    attrs: dict[str, Any] | None = None,
    stream: str = DEFAULT_STREAM,
) -> int:
    """Synchronous wrapper: publish one ``listing`` update or ``delete`` message."""
    headers = make_headers(kind, listing_id, image_id, attrs)
    return asyncio.run(publish(url, subject, [(b"", headers)], stream=stream))
