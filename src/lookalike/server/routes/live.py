"""``GET /live``: server-sent events (``text/event-stream``) of what arrives, for the page's
Live tab.

Two kinds of event, JSON in ``data``:

* ``image``: an image this server process wrote (``POST /images``; a catalog write listener,
  ``Catalog.add_write_listener``): ``{"listing_id", "image_id", "status", "at",
  "thumbnail_url"}``;
* ``match``: a row of the catalog's ``matches`` table, whoever wrote it (the stream consumer's
  match on arrival, any process's watchlist matches), found by tailing the table's change
  sequence twice a second while a client listens: the fields of ``GET
  /watchlists/{name}/hits`` (:class:`~lookalike.server.routes.watch.MatchOut`); the SSE
  ``id`` is the row's ``seq``.

``?watchlist=NAME`` sends only that watchlist's matches (no ``image`` events); ``?backlog=N``
(default 20) sends the newest N matches first, or, on a reconnect with ``Last-Event-ID``, the
matches after it. The stream follows new events only for a client that accepts
``text/event-stream`` (``EventSource`` does); for any other the backlog is the whole answer
(a poll). Each client has a bounded queue (:data:`QUEUE_SIZE`): a client too slow to
keep up is dropped (its stream ends; ``EventSource`` reconnects). A stream lasts at most
:data:`STREAM_S` seconds, then ends with ``retry`` set, so that a server shutting down never
waits long on an open page; the browser reconnects by itself. Reads follow the read rules.
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
from .watch import NAME_PATTERN, match_out

router = APIRouter(route_class=ServerRoute, tags=["live"], responses=ERRORS)

#: Events a client may have waiting; one more and the client is dropped.
QUEUE_SIZE = 256
#: Seconds between looks at the ``matches`` table while a client listens.
POLL_S = 0.5
#: Seconds a stream lasts before it ends (the browser reconnects after ``RETRY_MS``).
STREAM_S = 25.0
#: Milliseconds the browser waits before it reconnects.
RETRY_MS = 500
#: Most matches sent on connect.
MAX_BACKLOG = 200


@dataclass(eq=False)
class _Client:
    """One listener: its queue, its filter, and whether it was dropped."""

    watchlist: str | None
    queue: asyncio.Queue[tuple[str, dict[str, Any], str | None]] = field(
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
        self.seq: int | None = None  # the newest match row sent
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

    def fanout(self, kind: str, item: dict[str, Any], event_id: str | None) -> None:
        """Queue an event for every client that wants it; drop a client whose queue is full."""
        for client in list(self.clients):
            if not client.wants(kind, item):
                continue
            try:
                client.queue.put_nowait((kind, item, event_id))
            except asyncio.QueueFull:
                client.dropped = True
                self.clients.discard(client)

    async def subscribe(self, watchlist: str | None) -> _Client:
        """A new client; starts the poller of the ``matches`` table."""
        client = _Client(watchlist)
        if self.seq is None:
            newest = await run_in_threadpool(self.catalog.latest_matches, 1)
            self.seq = newest[-1].seq if newest else 0
        self.clients.add(client)
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll())
        return client

    def unsubscribe(self, client: _Client) -> None:
        """Forget a client (its stream ended)."""
        self.clients.discard(client)

    async def _poll(self) -> None:
        while self.clients:
            try:
                rows = await run_in_threadpool(self.catalog.matches_since, self.seq or 0, 500)
            except Exception:  # the store is busy or gone: try again
                rows = []
            for row in rows:
                self.seq = max(self.seq or 0, row.seq)
                self.fanout("match", match_out(row), str(row.seq))
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


@router.get(
    "/live",
    response_class=EventSourceResponse,
    dependencies=READ,
    summary="Server-sent events of arriving images and their matches",
)
async def live(
    request: Request,
    watchlist: Annotated[
        str | None, Query(pattern=NAME_PATTERN, description="Only this watchlist's matches.")
    ] = None,
    backlog: Annotated[int, Query(ge=0, le=MAX_BACKLOG, description="Recent matches first.")] = 20,
    last_event_id: Annotated[str | None, Header(max_length=32)] = None,
    accept: Annotated[str | None, Header(max_length=1024)] = None,
) -> AsyncIterator[ServerSentEvent]:
    hub = hub_of(request)
    client = await hub.subscribe(watchlist)
    try:
        cat = hub.catalog
        if last_event_id is not None and last_event_id.isdigit():
            past = await run_in_threadpool(
                cat.matches_since, int(last_event_id), MAX_BACKLOG, watchlist
            )
        elif backlog:
            past = await run_in_threadpool(_newest, cat, backlog, watchlist)
        else:
            past = []
        yield ServerSentEvent(comment="lookalike live", retry=RETRY_MS)
        sent = 0
        for row in past:
            if row.seq <= (hub.seq or 0):
                sent = max(sent, row.seq)
                yield ServerSentEvent(event="match", data=match_out(row), id=str(row.seq))
        if "text/event-stream" not in (accept or ""):
            return  # not an event-stream client: the backlog is the whole answer
        deadline = time.monotonic() + STREAM_S
        while not client.dropped and time.monotonic() < deadline:
            try:
                kind, item, event_id = await asyncio.wait_for(client.queue.get(), 1.0)
            except TimeoutError:
                if await request.is_disconnected():
                    break
                continue
            if kind == "match" and event_id is not None and int(event_id) <= sent:
                continue  # sent with the backlog already
            yield ServerSentEvent(event=kind, data=item, id=event_id)
    finally:
        hub.unsubscribe(client)


def _newest(cat: Catalog, n: int, watchlist: str | None) -> list[Any]:
    if watchlist is None:
        return cat.latest_matches(n)
    return cat.watch_hits(watchlist, n)
