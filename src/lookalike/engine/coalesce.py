"""Coalesced calls: concurrent requests that arrive together are served by one batch call.

A batch of queries costs far less than the same queries one by one (one pass over the codes
serves many queries: ``refine.py``), so concurrent searches are gathered. There is no timer
and no background thread: the first caller becomes the *leader* and serves a batch of
whatever is queued (at first, its own request); requests that arrive while a batch runs queue
up, and when it ends the leader hands leadership to the oldest queued caller, which serves the
next batch, up to :attr:`Coalescer.max_batch` requests. A lone request is served at once, at
the cost of a single call; under load, batches grow with the time a batch takes. Every leader
serves exactly one batch, so no caller waits for more than the batch before its own and its
own.

An optional gathering window (``gather_s``) makes a leader wait before it takes the queue;
``benchmarks/scale.py --threads`` measures it (no window was best on 2 cores).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

Req = TypeVar("Req")
Res = TypeVar("Res")

#: Requests served by one batch call at most.
MAX_BATCH = 64


class _Slot(Generic[Req, Res]):
    """One caller's request, its outcome and its wake-up call."""

    __slots__ = ("done", "error", "event", "leads", "request", "result")

    def __init__(self, request: Req) -> None:
        self.request = request
        self.event = threading.Event()
        self.leads = False
        self.done = False
        self.result: Res | None = None
        self.error: BaseException | None = None


class Coalescer(Generic[Req, Res]):
    """Serve concurrent :meth:`submit` calls through batch calls of ``run`` (module docstring).

    Args:
        run: serves a batch: ``requests -> one result or exception per request``, in order.
            An exception it raises is given to every request of the batch.
        max_batch: requests per batch at most.
        gather_s: seconds a leader waits for more requests before taking the queue (0: none).

    Attributes:
        batches: batch calls made; ``requests``: requests served (``requests / batches`` is
            the mean batch size).
    """

    def __init__(
        self,
        run: Callable[[list[Req]], Sequence[Res | BaseException]],
        max_batch: int = MAX_BATCH,
        gather_s: float = 0.0,
    ) -> None:
        self._run = run
        self.max_batch = max(1, max_batch)
        self.gather_s = gather_s
        self._lock = threading.Lock()
        self._queue: list[_Slot[Req, Res]] = []
        self._busy = False
        self.batches = 0
        self.requests = 0

    @property
    def queued(self) -> int:
        """Requests waiting for a batch (not the ones of the batch being served)."""
        with self._lock:
            return len(self._queue)

    def submit(self, request: Req) -> Res:
        """Serve ``request`` (in a batch with concurrent ones) and return its result.

        Raises:
            BaseException: whatever ``run`` gave or raised for this request.
        """
        slot: _Slot[Req, Res] = _Slot(request)
        with self._lock:
            self._queue.append(slot)
            if not self._busy:
                self._busy = slot.leads = True
        while not slot.done:
            if slot.leads:
                self._serve(slot)
            else:
                slot.event.wait()
                slot.event.clear()
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[return-value]  # set with done

    def _serve(self, me: _Slot[Req, Res]) -> None:
        """Serve one batch (``me`` first), then hand leadership to the oldest queued caller."""
        try:
            if self.gather_s > 0:
                time.sleep(self.gather_s)
            with self._lock:
                batch = self._queue[: self.max_batch]
                del self._queue[: self.max_batch]
            try:
                outcomes: Sequence[Res | BaseException] = self._run([s.request for s in batch])
                if len(outcomes) != len(batch):
                    raise RuntimeError(f"batch of {len(batch)} gave {len(outcomes)} outcomes")
            except BaseException as exc:  # every caller of the batch gets it
                outcomes = [exc] * len(batch)
            self.batches += 1
            self.requests += len(batch)
            for slot, outcome in zip(batch, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    slot.error = outcome
                else:
                    slot.result = outcome
                slot.done = True
                if slot is not me:
                    slot.event.set()
        finally:
            with self._lock:
                me.leads = False
                if self._queue:
                    nxt = self._queue[0]
                    nxt.leads = True
                    nxt.event.set()
                else:
                    self._busy = False


class BatchPolicy:
    """Whether a batch scan of several queries costs less per query than scanning them one by
    one, measured as searches are served (an exponential moving average of seconds per query
    of each way, weight :attr:`alpha`).

    A batch shares one pass over the codes, but a query whose answer needs the exactness
    proof's widening step is scanned again on its own (``refine.py``): on data where most
    queries widen (crowded scores) a batch costs more than single scans. Batches are tried
    first; once both ways are measured the cheaper one is used, and the other is tried again
    every :attr:`explore` decisions so that a change (data, load) is seen. Trying single scans
    again takes one query of the batch, not all of them: a single scan costs the same whatever
    the batch, and at 1M x 512 one costs 4.5x a query of a batch of 8 (26 ms against 5.8), so
    scanning a whole batch one by one every 16 batches spent a fifth of a busy server's scan
    time on measuring.
    """

    def __init__(self, alpha: float = 0.3, explore: int = 16) -> None:
        self.alpha = alpha
        self.explore = explore
        self.per_query: dict[bool, float] = {}  # batched? -> seconds per query
        self._decisions = 0

    def singles(self, n: int) -> int:
        """How many of ``n`` queries (``n > 1``) to scan one by one; the rest are scanned as
        one batch: 0 (batches measured cheaper, or not yet measured), ``n`` (single scans
        measured cheaper), or 1 to measure a single scan (none measured yet, or every
        :attr:`explore`-th decision while batches are cheaper)."""
        self._decisions += 1
        batch, single = self.per_query.get(True), self.per_query.get(False)
        explore = self._decisions % self.explore == 0
        if batch is None:
            return 0
        if single is None:
            return 1
        if batch <= single:
            return 1 if explore else 0
        return 0 if explore else n

    def record(self, batched: bool, n: int, seconds: float) -> None:
        """Record that ``n`` queries took ``seconds`` (one batch, or one by one)."""
        if n < 1:
            return
        value = seconds / n
        old = self.per_query.get(batched)
        self.per_query[batched] = value if old is None else old + self.alpha * (value - old)
