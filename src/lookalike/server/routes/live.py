"""``GET /live``: server-sent events (``text/event-stream``) of what arrives, for the page's
Live tab.

Two kinds of event, JSON in ``data``:

* ``image``: an image this server process wrote (``POST /images``; a catalog write listener,
  ``Catalog.add_write_listener``): ``{"listing_id", "image_id", "status", "at",
  "thumbnail_url"}``;
* ``match``: a row of the catalog's ``matches`` table, whoever wrote it (the stream consumer's
  match on arrival, any process's watchlist matches), found by tailing the table's change
  sequence twice a second while a client listens: the fields of ``GET /matches``
  (:class:`~lookalike.server.routes.watch.MatchOut`); the SSE
  ``id`` is the row's place in commit order, ``<seq>-<id>`` (one write's rows share a
  ``seq``, so a stream cut inside a write resumes at the next row of it).

``?watchlist=NAME`` sends only that watchlist's matches (no ``image`` events); ``?backlog=N``
(default 20) sends the newest N matches first, or, on a reconnect with ``Last-Event-ID``, the
matches after it. The stream follows new events only for a client that accepts
``text/event-stream`` (``EventSource`` and the page's reader do); for any other the backlog is
the whole answer (a poll). A stream ends after ``?max_seconds=`` (default and most
:data:`STREAM_S`) or ``?max_events=`` events (the backlog's included), with ``retry`` set, so
that a server shutting down never waits long on an open page and ``curl`` can take a bounded
sample; a browser reconnects by itself. Each client has a bounded queue (:data:`QUEUE_SIZE`):
a client too slow to keep up is dropped (its stream ends; it reconnects).

Reads follow the read rules: with ``serve --read-token`` the token is checked before the stream
starts (401 otherwise). ``EventSource`` cannot send it, so the page reads the stream with
``fetch`` and the ``Authorization`` header (``static/app.js``), never with the token in the URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.sse import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from ...catalog import Catalog
from ...types import Key, WriteStatus
from ..deps import READ
from ..routing import ServerRoute
from ..schemas import ERRORS, thumbnail_url
from .watch import NAME_PATTERN, match_out, newest_matches

router = APIRouter(route_class=ServerRoute, tags=["live"], responses=ERRORS)

#: Events a client may have waiting; one more and the client is dropped.
QUEUE_SIZE = 256
#: Seconds between looks at the ``matches`` table while a client listens.
POLL_S = 0.5
#: Seconds a stream lasts at most before it ends (the browser reconnects after ``RETRY_MS``).
STREAM_S = 25.0
#: Milliseconds the browser waits before it reconnects.
RETRY_MS = 500
#: Most matches sent on connect.
MAX_BACKLOG = 200


#: A ``matches`` row's place in commit order: ``(seq, id)``.
Cursor = tuple[int, int]


def event_id(cursor: Cursor) -> str:
    """The SSE ``id`` of a match event: ``<seq>-<id>``."""
    return f"{cursor[0]}-{cursor[1]}"


def parse_event_id(text: str) -> tuple[int, int | None] | None:
    """``(seq, id)`` of a ``Last-Event-ID`` (:data:`EVENT_ID_PATTERN`): ``<seq>-<id>``, or
    ``(seq, None)`` for ``<seq>`` alone (after that whole write); None for anything else."""
    seq, _, row = text.partition("-")
    if not seq.isascii() or not seq.isdigit() or (row and not (row.isascii() and row.isdigit())):
        return None
    return int(seq), int(row) if row else None


@dataclass(eq=False)
class _Client:
    """One listener: its queue, its filter, and whether it was dropped."""

    watchlist: str | None
    queue: asyncio.Queue[tuple[str, dict[str, Any], Cursor | None]] = field(
        default_factory=lambda: asyncio.Queue(QUEUE_SIZE)
    )
    dropped: bool = False

    def wants(self, kind: str, item: dict[str, Any]) -> bool:
        if self.watchlist is None:
            return True
        return kind == "match" and item.get("watchlist") == self.watchlist


class LiveHub:
    """The clients of one server (one event loop): fan-out of written images (from any thread)
    and of new ``matches`` rows (one poller while anyone listens)."""

    def __init__(self, catalog: Catalog, loop: asyncio.AbstractEventLoop) -> None:
        self.catalog, self.loop = catalog, loop
        self.clients: set[_Client] = set()
        self.cursor: Cursor | None = None  # the newest match row fanned out
        self._poller: asyncio.Task[None] | None = None
        catalog.add_write_listener(self.written)

    def close(self) -> None:
        """Stop listening to the catalog's writes."""
        self.catalog.remove_write_listener(self.written)

    def written(self, items: list[tuple[Key, WriteStatus]]) -> None:
        """The catalog's write listener (any thread): ``image`` events."""
        if not self.clients:
            return
        now = time.time()
        for (lid, iid), status in items:
            event = {
                "listing_id": lid,
                "image_id": iid,
                "status": str(status),
                "at": now,
                "thumbnail_url": thumbnail_url(iid, lid),
            }
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
                self.loop.call_soon_threadsafe(self.fanout, "image", event, None)

    def fanout(self, kind: str, item: dict[str, Any], cursor: Cursor | None) -> None:
        """Queue an event for every client that wants it; drop a client whose queue is full."""
        for client in list(self.clients):
            if not client.wants(kind, item):
                continue
            try:
                client.queue.put_nowait((kind, item, cursor))
            except asyncio.QueueFull:
                client.dropped = True
                self.clients.discard(client)

    def subscribe(self, watchlist: str | None) -> _Client:
        """A new client: it gets every ``image`` event from now on; :meth:`follow` starts
        its ``match`` events."""
        client = _Client(watchlist)
        self.clients.add(client)
        return client

    async def follow(self) -> None:
        """Start the poller of the ``matches`` table (from the newest row, on first use)."""
        if self.cursor is None:
            newest = await run_in_threadpool(self.catalog.latest_matches, 1)
            if self.cursor is None:
                self.cursor = (newest[-1].seq, newest[-1].id) if newest else (0, 0)
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll())

    def unsubscribe(self, client: _Client) -> None:
        """Forget a client (its stream ended)."""
        self.clients.discard(client)

    async def _poll(self) -> None:
        while self.clients:
            seq, row_id = self.cursor or (0, 0)
            try:
                rows = await run_in_threadpool(self.catalog.matches_since, seq, 500, None, row_id)
            except Exception:  # the store is busy or gone: try again
                rows = []
            for row in rows:
                self.cursor = (row.seq, row.id)
                self.fanout("match", match_out(row), self.cursor)
            if len(rows) < 500:
                await asyncio.sleep(POLL_S)


def hub_of(request: Request) -> LiveHub:
    """The app's hub for the running event loop (made on first use)."""
    loop = asyncio.get_running_loop()
    hub: LiveHub | None = getattr(request.app.state, "live", None)
    if hub is None or hub.loop is not loop:
        if hub is not None:
            hub.close()
        hub = LiveHub(request.app.state.server.catalog, loop)
        request.app.state.live = hub
    return hub


#: ``Last-Event-ID`` as this server sends it (:func:`event_id`), or a ``seq`` alone.
EVENT_ID_PATTERN = r"^[0-9]{1,18}(-[0-9]{1,18})?$"
#: Most events one stream may be asked to end after.
MAX_EVENTS = 10_000


@router.get(
    "/live",
    operation_id="live",
    response_class=EventSourceResponse,
    dependencies=READ,
    summary="Server-sent events of arriving images and their matches",
    description="`event: image` (an image this server wrote) and `event: match` (a new row of "
    "the matches table; `id` is `<seq>-<row id>`, commit order), JSON in `data`. Send "
    "`Accept: text/event-stream` to follow new events; otherwise the answer is the backlog "
    "alone. The stream ends after `max_seconds` or `max_events`; reconnect with "
    "`Last-Event-ID` to resume the matches.",
)
async def live(
    request: Request,
    watchlist: Annotated[
        str | None, Query(pattern=NAME_PATTERN, description="Only this watchlist's matches.")
    ] = None,
    backlog: Annotated[
        int, Query(ge=0, le=MAX_BACKLOG, description="The newest matches, sent first.")
    ] = 20,
    max_events: Annotated[
        int | None,
        Query(
            ge=1, le=MAX_EVENTS, description="End the stream after this many events (backlog too)."
        ),
    ] = None,
    max_seconds: Annotated[
        float, Query(gt=0, le=STREAM_S, description="End the stream after this many seconds.")
    ] = STREAM_S,
    last_event_id: str = Header(  # absent is None; a header is never null (no | None)
        None,
        pattern=EVENT_ID_PATTERN,
        description="The last match's id seen: send the matches after it (not the backlog).",
    ),
) -> AsyncIterator[ServerSentEvent]:
    follow = "text/event-stream" in request.headers.get("accept", "")
    deadline = time.monotonic() + max_seconds
    left = MAX_EVENTS if max_events is None else max_events
    hub = hub_of(request)
    # subscribed before the head goes out: a client that has read the head sees every image
    # written after it; the head and the reconnect delay go out before any store read
    client = hub.subscribe(watchlist)
    try:
        yield ServerSentEvent(comment="lookalike live", retry=RETRY_MS)
        await hub.follow()
        cat = hub.catalog
        after = None if last_event_id is None else parse_event_id(last_event_id)
        if after is not None:
            past = await run_in_threadpool(
                cat.matches_since, after[0], MAX_BACKLOG, watchlist, after[1]
            )
        elif backlog:
            past = await run_in_threadpool(newest_matches, cat, backlog, watchlist)
        else:
            past = []
        sent: Cursor = (0, 0)
        for row in past:  # newer rows than the hub's come through the queue
            if (row.seq, row.id) <= (hub.cursor or (0, 0)) and left > 0:
                sent = (row.seq, row.id)  # rows come in (seq, id) order
                left -= 1
                yield ServerSentEvent(event="match", data=match_out(row), id=event_id(sent))
        if not follow:
            return  # not an event-stream client: the backlog is the whole answer
        while not client.dropped and left > 0:
            wait = min(1.0, deadline - time.monotonic())
            if wait <= 0:
                break
            try:
                kind, item, cursor = await asyncio.wait_for(client.queue.get(), wait)
            except TimeoutError:
                if await request.is_disconnected():
                    break
                continue
            if cursor is not None and cursor <= sent:
                continue  # sent with the backlog already
            left -= 1
            yield ServerSentEvent(
                event=kind, data=item, id=None if cursor is None else event_id(cursor)
            )
    finally:
        hub.unsubscribe(client)
