"""Match events on NATS JetStream: the consumer's match-on-arrival step, the outbox relay of
watchlist matches, and the streams that keep both (for de-duplication).

**Streams.** Events carry ``Nats-Msg-Id`` = their event id (derived from the image's key and
SHA-256, :func:`lookalike.catalog.match_event_id`). JetStream drops a message whose id it has
seen within the stream's duplicate window, but only on a subject a stream captures: so the
subjects are captured by streams created here when no stream captures them yet,
``LOOKALIKE_MATCHES`` (the match subject, default ``lookalike.matches``) and
``LOOKALIKE_WATCH`` (``lookalike.watch.>``), file storage, a 2-minute duplicate window
(:func:`lookalike.stream.connection.ensure_stream`). Subscribers read them with any JetStream
consumer (or a plain subscription to the subject).

**At least once, never twice accepted.** The consumer publishes a batch's events, waiting for
each broker acknowledgement, *before* it acknowledges the batch's image messages; a consumer
killed in between has its messages redelivered, finds the images already stored, matches them
again and publishes the same event ids, which the stream drops as duplicates
(``PubAck.duplicate``). Watchlist matches are rows of the store's ``matches`` table, written
in the image's own transaction (the **outbox**); :func:`relay_outbox` publishes the rows not
yet published and then marks them, so a crash in between publishes them again under the same
ids (dropped as duplicates). Redelivery later than the duplicate window would publish an
event twice: keep ``ack_wait`` well under 2 minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..catalog import Catalog
from ..errors import ImageError
from ..images import sha256_hex
from ..recognize.watch import (
    DEFAULT_MATCH_SUBJECT,
    WATCH_SUBJECT_PREFIX,
    Arrival,
    ArrivalMatching,
    MatchEvent,
    match_arrivals,
    stored_vectors,
    watch_events,
    watch_subject,
)
from .connection import DEFAULT_URL, Notify, broker_error, connect, ensure_stream
from .messages import Event

log = logging.getLogger(__name__)

#: The stream created to capture the match subject (when none captures it).
MATCH_STREAM = "LOOKALIKE_MATCHES"
#: The stream created to capture ``lookalike.watch.>``.
WATCH_STREAM = "LOOKALIKE_WATCH"
#: Outbox rows read per round of :func:`relay_outbox`.
RELAY_BATCH = 500


def subject_overlaps(a: str, b: str) -> bool:
    """Whether two NATS subject filters can match a common subject."""
    ta, tb = a.split("."), b.split(".")
    for i in range(max(len(ta), len(tb))):
        x = ta[i] if i < len(ta) else None
        y = tb[i] if i < len(tb) else None
        if x == ">" or y == ">":
            return x is not None and y is not None
        if x is None or y is None:
            return False
        if x != y and "*" not in (x, y):
            return False
    return True


async def ensure_capture(js: Any, subject: str, stream: str) -> str:
    """The stream that captures ``subject``: one that already does, else ``stream`` created
    for it (or, when ``stream`` exists for other subjects, ``stream_<hash>``)."""
    from nats.js.errors import NotFoundError

    try:
        return str(await js.find_stream_name_by_subject(subject))
    except NotFoundError:
        pass
    try:
        await js.stream_info(stream)
        stream = f"{stream}_{hashlib.sha256(subject.encode()).hexdigest()[:8].upper()}"
    except NotFoundError:
        pass
    return await ensure_stream(js, stream, [subject])


async def ensure_event_streams(
    js: Any, match_subject: str | None = DEFAULT_MATCH_SUBJECT, watch: bool = True
) -> None:
    """Make sure the match subject (when given) and, with ``watch``, ``lookalike.watch.>``
    are captured (see the module docstring)."""
    if match_subject is not None:
        await ensure_capture(js, match_subject, MATCH_STREAM)
    if watch:
        await ensure_capture(js, f"{WATCH_SUBJECT_PREFIX}.>", WATCH_STREAM)


async def publish_events(js: Any, events: Sequence[tuple[str, MatchEvent]]) -> tuple[int, int]:
    """Publish ``(subject, event)`` pairs with ``Nats-Msg-Id`` = the event id, waiting for
    each broker acknowledgement.

    Returns:
        ``(accepted, duplicates)``: events the stream stored, and events it dropped as
        duplicates of an id it had seen.
    """
    accepted = duplicates = 0
    for subject, ev in events:
        ack = await js.publish(
            subject,
            json.dumps(ev.body, ensure_ascii=False).encode(),
            headers={"Nats-Msg-Id": ev.event_id},
            timeout=30,
        )
        if getattr(ack, "duplicate", False):
            duplicates += 1
        else:
            accepted += 1
    return accepted, duplicates


async def relay_outbox(cat: Catalog, js: Any, limit: int = RELAY_BATCH) -> tuple[int, int]:
    """Publish the watchlist matches still in the catalog's outbox to
    ``lookalike.watch.<name>`` and mark them published, until the outbox is empty.

    Returns:
        ``(accepted, duplicates)`` as :func:`publish_events`.

    Raises:
        Exception: the broker or the store failed; what was not marked stays in the outbox.
    """
    accepted = duplicates = 0
    while True:
        rows = await asyncio.to_thread(cat.outbox, limit)
        if not rows:
            return accepted, duplicates
        full = len(rows) >= limit
        if full:  # the last event may go on in the next page: send it whole, next round
            head = [r for r in rows if r.event_id != rows[-1].event_id]
            rows = head or rows
        events = await asyncio.to_thread(watch_events, cat, rows)
        a, d = await publish_events(
            js, [(watch_subject(e.records[0].watchlist), e) for e in events]
        )
        accepted, duplicates = accepted + a, duplicates + d
        await asyncio.to_thread(cat.mark_published, [r.id for r in rows])
        if not full:
            return accepted, duplicates


def default_match_threshold(cat: Catalog) -> tuple[float, str]:
    """The default threshold of match on arrival and of new watchlist entries, and where it
    comes from: the catalog's calibrated near-duplicate threshold, else its extractor's
    measured one (``lookalike.extract.NEAR_DUPLICATE_THRESHOLDS``; also for a new, empty
    catalog).

    Raises:
        LookalikeError: none is known (vectors of an outside model): give a threshold.
    """
    from ..analytics.calibrate import near_duplicate_threshold
    from ..extract import default_near_duplicate_threshold

    if cat.model is None:
        info = cat.extractor.info
        value = default_near_duplicate_threshold(info)
        if value is not None:
            return value, f"the {info.tag} default (benchmarks/calibrate.py)"
    return near_duplicate_threshold(cat)


def embed_payloads(cat: Catalog, payloads: Sequence[bytes]) -> tuple[np.ndarray, list[str | None]]:
    """Embed encoded images: ``(n, d) float32`` (zero rows for images that failed) and, per
    image, None or why it could not be read."""
    try:
        return cat.embed(list(payloads)), [None] * len(payloads)
    except ImageError:
        pass
    dim = cat.extractor.dim
    out = np.zeros((len(payloads), dim), dtype=np.float32)
    problems: list[str | None] = []
    for i, data in enumerate(payloads):
        try:
            out[i] = cat.embed([data])[0]
            problems.append(None)
        except ImageError as exc:
            problems.append(str(exc))
    return out, problems


@dataclass
class MatchStep:
    """The stream consumer's match on arrival (see the module docstring).

    Attributes:
        catalog: searched (and where catalog hits are recorded, unless ``match_only``).
        matching: threshold, k, filter, own-listing rule.
        subject: where events go (default ``lookalike.matches``).
        match_only: the images are not stored: they are embedded here, matched, and forgotten.
    """

    catalog: Catalog
    matching: ArrivalMatching
    subject: str = DEFAULT_MATCH_SUBJECT
    match_only: bool = False

    def check(self) -> None:
        """Fail early on a bad ``where`` (a search of a catalog that has vectors).

        Raises:
            QueryError: the filter is malformed or names an unknown attribute.
        """
        cat = self.catalog
        if cat.model is None or not self.matching.where or cat.count() == 0:
            return
        probe = np.ones((1, cat.model.dim), dtype=np.float32)
        cat.search_batch(probe, k=1, where=self.matching.where)

    def events(self, items: Sequence[tuple[Any, Event]]) -> tuple[list[MatchEvent], list[Any]]:
        """The events of the image messages ``items`` (already written unless
        ``match_only``), and the messages to dead-letter with a reason (images that do not
        decode, in match-only mode)."""
        cat = self.catalog
        arrivals = [
            Arrival(ev.listing_id, ev.image_id or "", sha256_hex(ev.payload), ev.event_time)
            for _, ev in items
        ]
        dead: list[tuple[Any, str]] = []
        if self.match_only:
            vectors, problems = embed_payloads(cat, [ev.payload for _, ev in items])
            ok = [p is None for p in problems]
            dead = [(m, p) for (m, _), p in zip(items, problems, strict=True) if p is not None]
            clf = cat.classifier
            if clf is not None and any(ok):
                predicted = clf.predict(vectors[ok], k=1)
                for arr, top in zip(
                    [a for a, g in zip(arrivals, ok, strict=True) if g], predicted, strict=True
                ):
                    arr.labels = {"predicted": top[0][0], "probability": round(top[0][1], 6)}
            for arr in arrivals:
                arr.labels = arr.labels or {}
        else:
            if cat.model is None:
                return [], []
            vectors, ok = stored_vectors(cat, [a.key for a in arrivals])
        keep = np.flatnonzero(ok)
        if not len(keep):
            return [], dead
        events = match_arrivals(cat, [arrivals[i] for i in keep], vectors[keep], self.matching)
        return events, dead

    def record(self, events: Sequence[MatchEvent]) -> None:
        """Record published catalog hits in the ``matches`` table (marked published),
        unless ``match_only``."""
        if self.match_only or not events:
            return
        now = time.time()
        rows = [r for e in events for r in e.records]
        for r in rows:
            r.published_at = now
        self.catalog.record_matches(rows)


class WatchRelay:
    """``lookalike watch relay``: publish the outbox of a catalog (watchlist matches written by
    ``index`` or the HTTP server, which have no NATS connection) every ``interval`` seconds.

    Args:
        catalog: whose outbox.
        url: NATS server URL.
        interval: seconds between looks at the outbox.
        notify: receives one line per connection event.
    """

    def __init__(
        self,
        catalog: Catalog,
        url: str = DEFAULT_URL,
        interval: float = 0.5,
        notify: Notify | None = None,
    ) -> None:
        self.catalog, self.url, self.interval = catalog, url, interval
        self.notify = notify or (lambda text: log.warning("%s", text))
        self.published = 0
        self.duplicates = 0

    async def run(self, stop: asyncio.Event | None = None, once: bool = False) -> int:
        """Relay until ``stop`` is set (or once, with ``once``); returns events published.

        Raises:
            BrokerError: the broker cannot be reached at start.
        """
        stop = stop or asyncio.Event()
        try:
            nc = await connect(self.url, name=f"lookalike-relay-{os.getpid()}", notify=self.notify)
        except Exception as exc:
            raise broker_error(exc, f"cannot connect to NATS at {self.url}") from None
        try:
            js = nc.jetstream()
            await ensure_event_streams(js, None)
            while True:
                try:
                    a, d = await relay_outbox(self.catalog, js)
                    self.published, self.duplicates = self.published + a, self.duplicates + d
                except Exception as exc:  # broker or store outage: try again next round
                    err = broker_error(exc, "relay failed")
                    if once:
                        raise err from None
                    self.notify(f"relay: {err}; retrying")
                if once or stop.is_set():
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.interval)
        finally:
            await nc.close()
        return self.published
