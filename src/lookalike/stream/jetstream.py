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
* **isolates a poison message**: when the write of a batch fails, the batch is bisected and
  written in halves until the failing message(s) stand alone; every other message is written
  and acknowledged at once. A failing message is negatively acknowledged (redelivered after
  ``retry_delay``) until its JetStream delivery count reaches ``max_deliver``, then
  dead-lettered with the reason and a ``Dead-Deliveries`` header, and acknowledged. A project
  error that is not the store's (``QueryError``: a bad attribute value) is dead-lettered at
  once: retrying cannot help;
* tells **the store is unavailable** from **this message fails**: when a write fails with a
  store error, the store is unavailable if the error is ``busy`` after waiting for another
  writer's lock (at least :data:`LOCK_WAIT_S`: SQLite waits up to its busy timeout) or the
  store does not answer a read. Then nothing is bisected (no second wait) and nothing is
  counted against the messages: the ones not written are redelivered, however often, until
  the store is back. Otherwise the store works and the failure is the message's own, whatever
  its kind (even a ``busy`` that waited for no one, which would otherwise come back
  forever): it is isolated and counted as above. A catalog of another version of the
  extractor (``ModelVersionError``: it waits for ``lookalike reindex``) counts as unavailable
  too: its messages are redelivered, not dead-lettered;
* sends progress acknowledgements while a batch is in hand, so a slow one is not redelivered
  after ``ack_wait``, and answers a delivery that the client library hands over twice as it
  answered the first copy, without writing it again (:mod:`lookalike.stream.deliveries`);
* on stop (SIGTERM in ``lookalike stream``) finishes the batch in hand (write, then ack) and
  exits;
* **matches on arrival** (with ``match``, :class:`~lookalike.stream.recognition.MatchStep`):
  searches the batch's images against the catalog in one batched search and publishes one
  event per matching image *before* acknowledging the batch (``match_only``: embeds and
  matches without writing); and **relays the outbox** of watchlist matches (``relay``: after
  every batch, and twice a second while idle). See :mod:`lookalike.stream.recognition` for
  the delivery guarantees of the events.

Connection events (disconnected, reconnected, a failed connect attempt) are reported as one
line each through ``notify`` (the CLI prints them), never as tracebacks; identical lines are
repeated at most every 10 s.

Several consumers with the same durable name share the stream's messages.

The connection helpers live in :mod:`lookalike.stream.connection` and publishing in
:mod:`lookalike.stream.publisher`; both are re-exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from ..catalog import Catalog
from ..errors import (
    LookalikeError,
    ModelVersionError,
    QueryError,
    StoreBusyError,
    StoreError,
    translate,
)
from .connection import (
    DEFAULT_STREAM,
    DEFAULT_URL,
    Notify,
    OneLine,
    broker_error,
    connect,
    ensure_stream,
    stream_subject,
)
from .deliveries import Deliveries, cancel, keep_in_progress
from .messages import BadMessageError, Event, parse_message
from .publisher import (
    PUBLISH_CONNECT_ATTEMPTS,
    PUBLISH_CONNECT_TIMEOUT,
    image_events,
    publish,
    publish_event,
    publish_images,
)
from .recognition import (
    MatchStep,
    ensure_event_streams,
    publish_events,
    relay_outbox,
    subject_overlaps,
)

__all__ = [  # re-exported from .connection and .publisher, with the consumer
    "DEFAULT_STREAM",
    "DEFAULT_URL",
    "PUBLISH_CONNECT_ATTEMPTS",
    "PUBLISH_CONNECT_TIMEOUT",
    "StreamCounts",
    "StreamIngest",
    "broker_error",
    "connect",
    "ensure_stream",
    "image_events",
    "publish",
    "publish_event",
    "publish_images",
]

log = logging.getLogger(__name__)

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
#: Deliveries of a message whose write keeps failing before it is dead-lettered.
DEFAULT_MAX_DELIVER = 5
#: Seconds before a message whose write failed is redelivered.
DEFAULT_RETRY_DELAY = 1.0
#: Header of a dead letter: the deliveries of the message before it was dead-lettered.
DEAD_DELIVERIES = "Dead-Deliveries"
#: Seconds a write that failed ``busy`` must have waited to count as another writer's lock
#: (the store is busy) rather than a failure of the batch itself (SQLite waits up to its
#: 60 s busy timeout before it answers "database is locked").
LOCK_WAIT_S = 5.0


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
    retried: int = 0
    matched: int = 0
    match_duplicates: int = 0
    watch_events: int = 0
    #: deliveries the client library handed over twice, answered again and skipped
    #: (:mod:`lookalike.stream.deliveries`)
    repeated_deliveries: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counts as a plain dict (for JSON)."""
        return asdict(self)


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
        max_deliver: deliveries of a message whose write keeps failing before it is
            dead-lettered (see the module docstring).
        retry_delay: seconds before such a message is redelivered.
        notify: receives one line per dead letter and per connection event (the CLI prints
            them); default: a warning in the log.
        match: match arriving images against the catalog and publish events (None: no).
        relay: publish the catalog's outbox of watchlist matches.

    Raises:
        LookalikeError: bad sizes, or a match subject that this consumer would consume.
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
        max_deliver: int = DEFAULT_MAX_DELIVER,
        retry_delay: float = DEFAULT_RETRY_DELAY,
        notify: Notify | None = None,
        match: MatchStep | None = None,
        relay: bool = True,
    ) -> None:
        if batch_size < 1 or max_in_flight < batch_size:
            raise LookalikeError("need 1 <= batch_size <= max_in_flight")
        if max_deliver < 1:
            raise LookalikeError("need max_deliver >= 1")
        self.catalog = catalog
        self.url, self.subject, self.stream, self.durable = url, subject, stream, durable
        self.batch_size, self.max_in_flight = batch_size, max_in_flight
        self.dead_letter, self.ack_wait, self.max_payload = dead_letter, ack_wait, max_payload
        self.decode_threads = decode_threads
        self.on_batch = on_batch
        self.max_deliver, self.retry_delay = max_deliver, retry_delay
        self.notify: Notify = notify or (lambda text: log.warning("%s", text))
        self.counts = StreamCounts()
        self.match, self.relay = match, relay
        self.deliveries = Deliveries(retry_delay)
        if match is not None and (
            subject_overlaps(subject, match.subject) or subject_overlaps(dead_letter, match.subject)
        ):
            raise LookalikeError(
                f"match subject {match.subject!r} overlaps the consumed subject {subject!r} "
                f"or the dead-letter subject {dead_letter!r}; choose another"
            )

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
        fetch_errors = OneLine(self.url, lambda text: log.warning("%s", text))
        try:
            nc = await connect(self.url, name=f"lookalike-stream-{os.getpid()}", notify=self.notify)
        except Exception as exc:
            raise broker_error(exc, f"cannot connect to NATS at {self.url}") from None
        try:
            js = nc.jetstream()
            await ensure_stream(js, self.stream, [stream_subject(self.subject)])
            await ensure_stream(js, f"{self.stream}_DEAD", [self.dead_letter])
            subject = self.match.subject if self.match is not None else None
            await ensure_event_streams(js, subject, watch=self.relay)
            if self.match is not None:
                await asyncio.to_thread(self.match.check)
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
                    fetch_errors(f"{broker_error(exc, 'fetch failed')}; retrying")
                    await asyncio.sleep(0.5)
                    continue
                if not msgs:
                    await self._relay(js)
                    if idle_exit is not None and time.monotonic() - last_message > idle_exit:
                        break
                    continue
                msgs = await self.deliveries.fresh(msgs)
                self.counts.repeated_deliveries = self.deliveries.repeated
                if msgs:
                    await self._handle(js, msgs)
                # idle time starts when the batch is done: a long batch (a model call, a
                # bisected write) is not idleness, and its retries are due right after it
                last_message = time.monotonic()
        finally:
            # every processed message is acked already: flush and close (draining a pull
            # subscription waits for its 30 s drain timeout)
            with contextlib.suppress(Exception):
                await nc.flush(timeout=5)
            await nc.close()
        return self.counts

    async def _handle(self, js: Any, msgs: list[Any]) -> None:
        """Process one fetched batch: parse, write (isolating failures), dead-letter, then
        acknowledge the done messages and negatively acknowledge the ones to retry."""
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
        written_dead: list[tuple[Any, str]] = []
        failures: list[tuple[Any, Exception]] = []
        unavailable = False
        heartbeat = asyncio.create_task(keep_in_progress(msgs, self.ack_wait))
        try:
            if self.match is None or not self.match.match_only:
                written_dead, failures, unavailable = await asyncio.to_thread(
                    self._write_isolating, events
                )
            await self._finish(
                js, msgs, events, dead, written_dead, failures, unavailable, heartbeat
            )
        finally:
            await cancel(heartbeat)

    async def _finish(
        self,
        js: Any,
        msgs: list[Any],
        events: list[tuple[Any, Event]],
        dead: list[tuple[Any, str]],
        written_dead: list[tuple[Any, str]],
        failures: list[tuple[Any, Exception]],
        unavailable: bool,
        heartbeat: asyncio.Task[None],
    ) -> None:
        """The rest of :meth:`_handle` after the write: dead-letter, match events, then the
        acks (and negative acks of the messages to retry), with ``heartbeat`` stopped first
        (a progress ack after a negative one would restart its ``ack_wait``)."""
        dead += written_dead
        if unavailable:  # the store's fault, not the messages': redeliver, count nothing
            reason = _reason(failures[0][1])
            log.error("write failed (%s); %d message(s) will be redelivered", reason, len(failures))
        retry: list[Any] = []
        for msg, problem in failures:
            reason = _reason(problem)
            err = translate(problem)
            n = msg.metadata.num_delivered
            if unavailable:
                retry.append(msg)
            elif isinstance(err, LookalikeError) and not isinstance(err, StoreError):
                dead.append((msg, reason))  # the message's own fault: retrying cannot help
            elif n >= self.max_deliver:
                dead.append((msg, f"write failed on {n} deliveries: {reason}"))
            else:
                retry.append(msg)
                log.warning(
                    "write of %s failed (delivery %d of at most %d; retrying): %s",
                    _describe(msg),
                    n,
                    self.max_deliver,
                    reason,
                    exc_info=problem
                    if n == 1 and err is None
                    else None,  # a bug: its traceback once
                )
        matches, match_dead, match_retry = await self._match_events(events, dead, failures)
        dead += match_dead
        retry += match_retry
        retrying = {id(m) for m in retry}
        try:
            for msg, reason in dead:
                headers = dict(msg.headers or {})
                headers.update(
                    {
                        "Dead-Reason": " ".join(reason.split())[:1000],
                        "Dead-Subject": msg.subject,
                        DEAD_DELIVERIES: str(msg.metadata.num_delivered),
                    }
                )
                await js.publish(self.dead_letter, msg.data, headers=headers, timeout=30)
                self.notify(f"dead letter from {msg.subject} ({_describe(msg)}): {reason}")
            if matches:  # before the acks: at least once (a redelivery repeats the ids)
                assert self.match is not None
                accepted, dups = await publish_events(
                    js, [(self.match.subject, e) for e in matches]
                )
                self.counts.matched += accepted
                self.counts.match_duplicates += dups
                try:
                    await asyncio.to_thread(self.match.record, matches)
                except Exception as exc:  # history only: the events are out
                    log.warning("could not record the catalog matches: %s", _reason(exc))
            await cancel(heartbeat)
            for msg in msgs:
                if id(msg) in retrying:
                    await msg.nak(delay=self.retry_delay)
                else:
                    await msg.ack()
                self.deliveries.answered(msg, id(msg) not in retrying)
        except Exception as exc:  # broker gone mid-batch: written rows are idempotent
            err = broker_error(exc, "could not finish the batch")
            log.warning("%s; the broker will redeliver it", err)
            return
        self.counts.dead += len(dead)
        self.counts.retried += len(retry)
        await self._relay(js)
        if self.on_batch:
            self.on_batch(self.counts)

    async def _match_events(
        self,
        events: list[tuple[Any, Event]],
        dead: list[tuple[Any, str]],
        failures: list[tuple[Any, Exception]],
    ) -> tuple[list[Any], list[tuple[Any, str]], list[Any]]:
        """The match events of the batch's images that were written (or, match-only, all
        its images): ``(events, messages to dead-letter, messages to retry)``. A failed
        search retries the images (their events must go out before their acks); a bad
        ``where`` (``QueryError``) stops the consumer."""
        if self.match is None:
            return [], [], []
        bad = {id(m) for m, _ in dead} | {id(m) for m, _ in failures}
        items = [(m, ev) for m, ev in events if ev.kind == "image" and id(m) not in bad]
        if not items:
            return [], [], []
        try:
            matches, match_dead = await asyncio.to_thread(self.match.events, items)
        except Exception as exc:
            if isinstance(translate(exc), QueryError):
                raise
            log.warning(
                "matching failed (%s); %d image(s) will be redelivered", _reason(exc), len(items)
            )
            return [], [], [m for m, _ in items]
        return matches, match_dead, []

    async def _relay(self, js: Any) -> None:
        """Publish the outbox (watchlist matches); a failure waits for the next round."""
        if not self.relay:
            return
        try:
            accepted, _ = await relay_outbox(self.catalog, js)
            self.counts.watch_events += accepted
        except Exception as exc:
            log.warning("outbox relay failed (%s); retrying later", _reason(exc))

    def _store_unavailable(self, err: LookalikeError | None, waited: float) -> bool:
        """Whether a write that failed with ``err`` after ``waited`` seconds met an
        unavailable store: ``busy`` after waiting for a lock, or no answer to a read; or a
        catalog of another version of the extractor (``lookalike reindex``): not the
        messages' fault, so they are redelivered, not dead-lettered."""
        if isinstance(err, ModelVersionError):
            return True
        if not isinstance(err, StoreError):
            return False
        if isinstance(err, StoreBusyError) and waited >= LOCK_WAIT_S:
            return True
        try:
            _ = self.catalog.settings
        except Exception:
            return True
        return False

    def _write_isolating(
        self, events: list[tuple[Any, Event]]
    ) -> tuple[list[tuple[Any, str]], list[tuple[Any, Exception]], bool]:
        """:meth:`_write` the events; when that raises, bisect until every failing message
        stands alone, so that the others are written; unless the store is unavailable
        (:meth:`_store_unavailable`), then stop at once.

        Returns:
            ``(dead, failed, unavailable)``: messages to dead-letter with their reason (bad
            images); ``(message, exception)`` for each message not written; whether that was
            because the store is unavailable.
        """
        before = dataclasses.replace(self.counts)
        t0 = time.monotonic()
        try:
            return self._write(events), [], False
        except Exception as exc:
            for f in dataclasses.fields(self.counts):  # the failed attempt counted nothing
                setattr(self.counts, f.name, getattr(before, f.name))
            failed = [(msg, exc) for msg, _ in events]
            if self._store_unavailable(translate(exc), time.monotonic() - t0):
                return [], failed, True
            if len(events) == 1:
                return [], failed, False
            mid = len(events) // 2
            dead_a, failed_a, unavailable = self._write_isolating(events[:mid])
            if unavailable:  # the rest would wait for the store as well
                return dead_a, failed_a + failed[mid:], True
            dead_b, failed_b, unavailable = self._write_isolating(events[mid:])
            return dead_a + dead_b, failed_a + failed_b, unavailable

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


def _reason(exc: BaseException) -> str:
    """One line naming what went wrong (the project's message for a known error)."""
    err = translate(exc)
    text = str(err) if err is not None else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


def _describe(msg: Any) -> str:
    """``listing/image`` of a message, for log lines."""
    h = msg.headers or {}
    return "/".join(x for x in (h.get("Listing-Id"), h.get("Image-Id")) if x) or "no ids"
