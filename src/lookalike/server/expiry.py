"""Saved search results expire: while the server runs, a background task deletes the results
of searches saved (``save=true``, or ``lookalike search --save``) longer ago than the
server's ``results_ttl`` (``lookalike serve --results-ttl``, default 7 days; 0 keeps them).

The task runs at start, then every :func:`interval` seconds; each round deletes at most
:data:`PRUNE_BATCH` searches in one store transaction (oldest first, through the store's
``created_at`` index) and runs again at once while there are more, so a backlog never holds
the store's write lock for long. A failure (the store is busy or down) is logged in one line
and retried on the next round. Deleted searches are counted in ``/metrics``
(``lookalike_saved_results_pruned``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from ..errors import translate
from .state import ServerState

log = logging.getLogger("lookalike.server")

#: Saved searches deleted per transaction.
PRUNE_BATCH = 1000
#: Longest wait between two rounds, seconds.
MAX_INTERVAL = 600.0


def interval(ttl: float) -> float:
    """Seconds between rounds for a retention of ``ttl`` seconds: a quarter of it, between
    1 s and :data:`MAX_INTERVAL` (so a result outlives its ttl by at most that much)."""
    return min(MAX_INTERVAL, max(1.0, ttl / 4))


async def prune_forever(state: ServerState) -> None:
    """Delete expired saved results, round after round, until cancelled."""
    ttl = state.settings.results_ttl
    while True:
        try:
            n = await run_in_threadpool(state.catalog.prune_results, ttl, limit=PRUNE_BATCH)
        except Exception as exc:  # logged and retried next round: the store may be busy
            mapped = translate(exc)
            reason = str(mapped) if mapped is not None else f"{type(exc).__name__}: {exc}"
            log.warning("pruning saved results failed (retrying later): %s", reason)
            n = 0
        if n:
            state.metrics.pruned.inc(n)
            log.info("pruned %d saved search results older than %g s", n, ttl)
        await asyncio.sleep(0 if n >= PRUNE_BATCH else interval(ttl))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The app's lifespan: the pruning task runs while the server does (when
    ``results_ttl`` > 0)."""
    state: ServerState = app.state.server
    task = None
    if state.settings.results_ttl > 0:
        task = asyncio.create_task(prune_forever(state))
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
