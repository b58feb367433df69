"""Real-time ingest from NATS JetStream: a durable pull consumer that writes into a catalog.

Delivery semantics: **at-least-once** from the broker (a message is acknowledged only after
the transaction that stores it has committed; a crashed consumer's unacknowledged messages are
redelivered after ``ack_wait``) **+ idempotent writes** (an image is keyed by
``(listing_id, image_id)`` and its bytes' SHA-256; a redelivered or re-published image is
recognised and skipped) **= no lost and no duplicated images**, across consumer crashes,
broker restarts (JetStream file storage) and redelivery. Listing updates and deletes are
idempotent by nature.

The consumer (:class:`StreamIngest`):

* fetches at most ``batch_size`` (<= ``max_in_flight``) messages at a time, so it never holds
  more than that many unacknowledged messages (backpressure; memory stays flat);
* parses each message (:mod:`lookalike.stream.messages`); decodes and embeds the images of
  a run of consecutive image messages as one batch, written in one transaction; applies
  listing updates and deletes in message order;
* sends bad messages (missing headers, undecodable or oversized image) to a dead-letter
  subject with a ``Dead-Reason`` header, acknowledges them, and goes on;
* on stop (SIGTERM in ``lookalike stream``) finishes the batch in hand (write, then ack) and
  exits; a batch whose write fails is negatively acknowledged for redelivery.

Several consumers with the same durable name share the stream's messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..catalog import Catalog
from ..errors import BrokerError, LookalikeError, StoreError, translate
from ..images import iter_sources, read_bytes, sha256_hex
from .messages import BadMessageError, Event, make_headers, parse_message

log = logging.getLogger(__name__)

DEFAULT_URL = "nats://127.0.0.1:4222"
DEFAULT_STREAM = "LOOKALIKE"
DEFAULT_SUBJECT = "images.>"
DEFAULT_DEAD_LETTER = "lookalike.dead"
DEFAULT_DURABLE = "lookalike"
#: The subject ``lookalike publish`` sends to: one subject under the consumer's filter.
DEFAULT_PUBLISH_SUBJECT = "images.in"
#: Messages fetched and written per batch (one model call, one store transaction).
DEFAULT_BATCH_SIZE = 32
#: Fetched messages not yet acknowledged, at most.
DEFAULT_MAX_IN_FLIGHT = 64
#: Seconds the broker waits for an acknowledgement before it redelivers.
DEFAULT_ACK_WAIT = 30.0
#: Default largest image payload, bytes (the server's ``max_payload`` must allow it: NATS's
#: own default is 1 MiB; the test and benchmark servers are started with 8 MiB).
DEFAULT_MAX_PAYLOAD = 8 * 2**20


@dataclass
class StreamCounts:
    """What a consumer has done since it started."""

    received: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    listings: int = 0
    deleted: int = 0
    dead: int = 0
    batches: int = 0
    redelivered: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counts as a plain dict (for JSON)."""
        return asdict(self)


async def connect(url: str, name: str = "lookalike") -> Any:
    """Connect to NATS, reconnecting forever (a broker restart is survived, not fatal)."""
    import nats

    return await nats.connect(
        servers=[url],
        name=name,
        reconnect_time_wait=0.5,
        max_reconnect_attempts=-1,
        connect_timeout=5,
        allow_reconnect=True,
    )


async def ensure_stream(js: Any, stream: str, subjects: Sequence[str]) -> str:
    """Make sure a JetStream stream captures ``subjects``; returns its name.

    An existing stream named ``stream``, or any stream already capturing the first subject,
    is used as it is; otherwise ``stream`` is created (file storage, 2-minute duplicate
    window for ``Nats-Msg-Id``).
    """
    from nats.js.api import StorageType, StreamConfig
    from nats.js.errors import NotFoundError

    try:
        await js.stream_info(stream)
        return stream
    except NotFoundError:
        pass
    try:
        return str(await js.find_stream_name_by_subject(subjects[0]))
    except NotFoundError:
        pass
    await js.add_stream(
        StreamConfig(
            name=stream, subjects=list(subjects), storage=StorageType.FILE, duplicate_window=120.0
        )
    )
    return stream


def broker_error(exc: BaseException, doing: str) -> LookalikeError:
    """What ``exc``, raised while talking to the broker, becomes.

    The one table (:func:`lookalike.errors.translate`) decides; an exception it does not know
    is still a broker failure here (the NATS client also raises ``OSError`` and
    ``asyncio.TimeoutError``), so it becomes :class:`~lookalike.errors.BrokerError`.

    Args:
        exc: the exception caught.
        doing: what was being done, prefixed to the message (``"cannot connect to ..."``).

    Returns:
        A project exception of the type the table chose, message ``"<doing>: <reason>"``.
    """
    err = translate(exc) or BrokerError(f"{type(exc).__name__}: {exc}")
    return type(err)(f"{doing}: {err}")


def _stream_subject(subject: str) -> str:
    """The subject a stream should capture for a publish/consume subject."""
    head = subject.split(".")[0]
    return f"{head}.>" if head != subject else subject


class StreamIngest:
    """A durable pull consumer writing into ``catalog`` (see the module docstring).

    Args:
        catalog: destination.
        url: NATS server URL.
        subject: subject filter of the consumer (``images.>``).
        stream: JetStream stream name (created if missing, capturing ``subject``).
        durable: durable consumer name; consumers sharing it share the messages.
        batch_size: messages per fetch and per write transaction.
        max_in_flight: upper bound on unacknowledged messages held (>= ``batch_size``).
        dead_letter: subject for bad messages (its own stream ``<stream>_DEAD`` keeps them).
        ack_wait: seconds before the broker redelivers an unacknowledged message.
        max_payload: largest accepted image, bytes.
        decode_threads: threads decoding images of a batch.
        on_batch: called with the counts after every batch (progress, tests).
    """

    def __init__(
        self,
        catalog: Catalog,
        url: str = DEFAULT_URL,
        subject: str = DEFAULT_SUBJECT,
        stream: str = DEFAULT_STREAM,
        durable: str = DEFAULT_DURABLE,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        dead_letter: str = DEFAULT_DEAD_LETTER,
        ack_wait: float = DEFAULT_ACK_WAIT,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        decode_threads: int = 2,
        on_batch: Callable[[StreamCounts], None] | None = None,
    ) -> None:
        if batch_size < 1 or max_in_flight < batch_size:
            raise LookalikeError("need 1 <= batch_size <= max_in_flight")
        self.catalog = catalog
        self.url, self.subject, self.stream, self.durable = url, subject, stream, durable
        self.batch_size, self.max_in_flight = batch_size, max_in_flight
        self.dead_letter, self.ack_wait, self.max_payload = dead_letter, ack_wait, max_payload
        self.decode_threads = decode_threads
        self.on_batch = on_batch
        self.counts = StreamCounts()

    async def run(
        self, stop: asyncio.Event | None = None, idle_exit: float | None = None
    ) -> StreamCounts:
        """Consume until ``stop`` is set (or no message came for ``idle_exit`` seconds).

        Raises:
            BrokerError: the broker cannot be reached at start.
        """
        from nats.errors import TimeoutError as NatsTimeout
        from nats.js.api import AckPolicy, ConsumerConfig

        stop = stop or asyncio.Event()
        try:
            nc = await connect(self.url, name=f"lookalike-stream-{os.getpid()}")
        except Exception as exc:
            raise broker_error(exc, f"cannot connect to NATS at {self.url}") from None
        try:
            js = nc.jetstream()
            await ensure_stream(js, self.stream, [_stream_subject(self.subject)])
            await ensure_stream(js, f"{self.stream}_DEAD", [self.dead_letter])
            config = ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=self.ack_wait,
                max_ack_pending=max(1000, self.max_in_flight),
            )
            sub = await js.pull_subscribe(
                self.subject, durable=self.durable, stream=self.stream, config=config
            )
            last_message = time.monotonic()
            while not stop.is_set():
                try:
                    msgs = await sub.fetch(self.batch_size, timeout=0.5)
                except NatsTimeout:
                    msgs = []
                except Exception as exc:  # broker restarting: the client reconnects
                    log.warning("%s; retrying", broker_error(exc, "fetch failed"))
                    await asyncio.sleep(0.5)
                    continue
                if not msgs:
                    if idle_exit is not None and time.monotonic() - last_message > idle_exit:
                        break
                    continue
                last_message = time.monotonic()
                await self._handle(js, msgs)
        finally:
            # every processed message is acked already: flush and close (draining a pull
            # subscription waits for its 30 s drain timeout)
            with contextlib.suppress(Exception):
                await nc.flush(timeout=5)
            await nc.close()
        return self.counts

    async def _handle(self, js: Any, msgs: list[Any]) -> None:
        """Process one fetched batch: parse, write, dead-letter, then acknowledge."""
        self.counts.received += len(msgs)
        self.counts.batches += 1
        events: list[tuple[Any, Event]] = []
        dead: list[tuple[Any, str]] = []
        for msg in msgs:
            if msg.metadata.num_delivered > 1:
                self.counts.redelivered += 1
            try:
                events.append((msg, parse_message(msg.headers, msg.data, self.max_payload)))
            except BadMessageError as exc:
                dead.append((msg, str(exc)))
        try:
            dead += await asyncio.to_thread(self._write, events)
        except Exception as exc:  # store unavailable: let the broker redeliver the batch
            err = translate(exc)
            if err is None:  # not a backend failure: keep the traceback for the operator
                log.exception("write failed; batch of %d will be redelivered", len(msgs))
            else:
                log.error("write failed (%s); batch of %d will be redelivered", err, len(msgs))
            for msg in msgs:
                with contextlib.suppress(Exception):  # unacked messages come back anyway
                    await msg.nak(delay=1.0)
            return
        try:
            for msg, reason in dead:
                headers = dict(msg.headers or {})
                headers.update({"Dead-Reason": reason[:1000], "Dead-Subject": msg.subject})
                await js.publish(self.dead_letter, msg.data, headers=headers, timeout=30)
                log.warning("dead-lettered a message from %s: %s", msg.subject, reason)
            for msg in msgs:
                await msg.ack()
        except Exception as exc:  # broker gone mid-batch: written rows are idempotent
            err = broker_error(exc, "could not finish the batch")
            log.warning("%s; the broker will redeliver it", err)
            return
        self.counts.dead += len(dead)
        if self.on_batch:
            self.on_batch(self.counts)

    def _write(self, events: list[tuple[Any, Event]]) -> list[tuple[Any, str]]:
        """Apply events in order (runs of images in one batch write); returns dead ones."""
        dead: list[tuple[Any, str]] = []
        cat = self.catalog
        i = 0
        while i < len(events):
            if events[i][1].kind == "image":
                j = i
                while j < len(events) and events[j][1].kind == "image":
                    j += 1
                run = events[i:j]
                statuses = cat.add_many(
                    [
                        (ev.payload, ev.listing_id, ev.image_id or "", f"nats:{msg.subject}")
                        for msg, ev in run
                    ],
                    decode_threads=self.decode_threads,
                )
                for (msg, ev), (status, reason) in zip(run, statuses, strict=True):
                    if status == "failed":
                        dead.append((msg, reason))
                        continue
                    setattr(self.counts, status, getattr(self.counts, status) + 1)
                    if ev.attrs:
                        cat.update_listing(ev.listing_id, **ev.attrs)
                i = j
                continue
            msg, ev = events[i]
            if ev.kind == "listing":
                try:
                    cat.update_listing(ev.listing_id, **ev.attrs)
                    self.counts.listings += 1
                except StoreError:  # the store, not the message: redeliver the batch
                    raise
                except LookalikeError as exc:  # a bad attribute: the message is dead
                    dead.append((msg, str(exc)))
            else:
                self.counts.deleted += cat.delete(ev.image_id or "", ev.listing_id)
            i += 1
        return dead


# ---------------------------------------------------------------------------------- publishing


async def publish(
    url: str,
    subject: str,
    events: Iterable[tuple[bytes, dict[str, str]]],
    stream: str = DEFAULT_STREAM,
) -> int:
    """Publish ``(payload, headers)`` messages to JetStream, waiting for each broker ack.

    Returns:
        Messages published.

    Raises:
        BrokerError: the broker cannot be reached.
    """
    try:
        nc = await connect(url, name=f"lookalike-publish-{os.getpid()}")
    except Exception as exc:
        raise broker_error(exc, f"cannot connect to NATS at {url}") from None
    n = 0
    try:
        js = nc.jetstream()
        await ensure_stream(js, stream, [_stream_subject(subject)])
        for payload, headers in events:
            await js.publish(subject, payload, headers=headers, timeout=30)
            n += 1
    finally:
        await nc.close()  # every publish was acknowledged by JetStream
    return n


def image_events(
    inputs: Sequence[str | os.PathLike[str]],
    attrs: dict[str, Any] | None = None,
    listing_id: str | None = None,
    image_id: str | None = None,
) -> Iterable[tuple[bytes, dict[str, str]]]:
    """Messages for image files (keys by the folder convention of ``lookalike index``, or the
    given ids for a single file), each with a broker de-duplication id."""
    for src in iter_sources(list(inputs)):
        data = read_bytes(src.location)
        lid = listing_id or src.listing_id
        iid = image_id or src.image_id
        headers = make_headers("image", lid, iid, attrs)
        headers["Nats-Msg-Id"] = f"{lid}/{iid}/{sha256_hex(data)}"
        yield data, headers


def publish_images(
    url: str, subject: str, inputs: Sequence[str | os.PathLike[str] | Path], **kwargs: Any
) -> int:
    """Synchronous wrapper: publish image files (see :func:`image_events`). Returns the count."""
    stream = kwargs.pop("stream", DEFAULT_STREAM)
    return asyncio.run(publish(url, subject, image_events(inputs, **kwargs), stream=stream))


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
