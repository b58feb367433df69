"""Delivery bookkeeping of the stream consumer (:class:`~lookalike.stream.jetstream.StreamIngest`):
how each JetStream delivery was answered, so that one handed over twice is answered again and
not processed twice, and the progress acknowledgements that keep a slow batch with its
consumer.

A delivery is ``(stream sequence, delivery count)``: the broker never sends the same one twice,
but on a loaded machine nats-py's ``fetch`` sometimes hands one over again in a later fetch (a
pull request of an earlier fetch that outlived its timeout: nats-io/nats.py#933 and #986), and
the broker then waits for the second copy's acknowledgement too. Writing it again would count
it ``unchanged`` and repeat its match event; leaving it unanswered would bring it back after
``ack_wait``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any

#: Deliveries remembered (about 100 bytes each).
HANDLED_MEMORY = 100_000


class Deliveries:
    """The answers given to the last :data:`HANDLED_MEMORY` deliveries of one consumer.

    Args:
        retry_delay: seconds before a negatively acknowledged repeat is redelivered.
    """

    def __init__(self, retry_delay: float) -> None:
        self.retry_delay = retry_delay
        self.repeated = 0  # deliveries handed over again and answered as their first copy
        # (stream sequence, delivery count) -> acknowledged (False: negatively)
        self._answers: collections.OrderedDict[tuple[int, int], bool] = collections.OrderedDict()

    @staticmethod
    def key(msg: Any) -> tuple[int, int]:
        """``(stream sequence, delivery count)`` of a JetStream message."""
        meta = msg.metadata
        return meta.sequence.stream, meta.num_delivered

    async def fresh(self, msgs: list[Any]) -> list[Any]:
        """The messages not answered before, in order; each repeat is answered as its first
        copy was (acknowledged, or negatively acknowledged after :attr:`retry_delay`)."""
        out = []
        for msg in msgs:
            acked = self._answers.get(self.key(msg))
            if acked is None:
                out.append(msg)
                continue
            self.repeated += 1
            with contextlib.suppress(Exception):  # broker gone: it redelivers anyway
                await (msg.ack() if acked else msg.nak(delay=self.retry_delay))
        return out

    def answered(self, msg: Any, acked: bool) -> None:
        """Remember that ``msg`` was acknowledged (``acked``) or negatively acknowledged."""
        self._answers[self.key(msg)] = acked
        if len(self._answers) > HANDLED_MEMORY:
            self._answers.popitem(last=False)


async def keep_in_progress(msgs: list[Any], ack_wait: float) -> None:
    """Tell the broker every ``ack_wait / 3`` seconds that ``msgs`` are still being worked on
    (JetStream's progress acknowledgement, ``+WPI``: it restarts their ``ack_wait``), so that a
    slow batch (a cold model, a loaded machine, a bisected write) is not redelivered while its
    consumer writes it. Runs until cancelled: cancel it before the batch's acknowledgements
    (a progress acknowledgement after a negative one would restart its ``ack_wait``)."""
    period = max(0.5, ack_wait / 3)
    while True:
        await asyncio.sleep(period)
        for msg in msgs:
            with contextlib.suppress(Exception):  # broker gone: it redelivers anyway
                await msg.in_progress()


async def cancel(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` and wait until it has stopped."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
