"""Store failures while consuming a real NATS JetStream stream: a message whose write fails with
a store error in a working store is isolated and dead-lettered after ``max_deliver``
deliveries, while the store being unavailable (down, or locked by another writer) counts no
delivery against any message."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

import lookalike
from lookalike.errors import StoreError
from lookalike.stream.jetstream import StreamIngest, publish
from lookalike.stream.messages import make_headers
from test_stream import count_rows, nats_server, read_dead  # noqa: F401  (nats_server: fixture)

pytestmark = [
    pytest.mark.skipif(not __import__("shutil").which("nats-server"), reason="no nats-server"),
    pytest.mark.usefixtures("no_orphans"),
]


def image_messages(demo_dir: Path, n: int, poison_at: int) -> list[tuple[bytes, dict[str, str]]]:
    """``n`` real demo photos as image messages, and a poison image (``moon/poison.jpg``)
    inserted at ``poison_at``."""
    photos = sorted((demo_dir / "photos").rglob("*.jpg"))[:n]
    msgs = [(p.read_bytes(), make_headers("image", p.parent.name, p.name)) for p in photos]
    poison = (photos[0].read_bytes(), make_headers("image", "moon", "moon/poison.jpg"))
    msgs.insert(poison_at, poison)
    return msgs


def has_poison(items: list[tuple[Any, ...]]) -> bool:
    return any(item[2] == "moon/poison.jpg" for item in items)


def test_a_message_failing_busy_in_a_working_store_is_dead_lettered(
    nats_server,  # noqa: F811
    demo_dir,
    tmp_path,
):
    """The write of one image always fails with "database is locked" at once (it waited for
    no lock: the store works, the other images are written). Before, a ``busy`` failure was
    taken for a busy store: the batch was not bisected and nothing was counted, so the batch
    came back forever (66 deliveries in 20 s) and its good images were never written."""
    asyncio.run(publish(nats_server.url, "images.in", image_messages(demo_dir, 6, 3)))
    cat_path = tmp_path / "cat"
    attempts: list[float] = []

    async def scenario() -> StreamIngest:
        with lookalike.open_catalog(cat_path, extractor="cnn") as cat:
            add_many = cat.add_many

            def failing(items, *args, **kwargs):
                if has_poison(items):
                    attempts.append(time.monotonic())
                    raise sqlite3.OperationalError("database is locked")
                return add_many(items, *args, **kwargs)

            cat.add_many = failing  # type: ignore[method-assign]
            # ack_wait 5 s, idle for 6 s: a negative acknowledgement that the broker loses on
            # a loaded machine still comes back (after ack_wait) before the consumer exits
            ingest = StreamIngest(
                cat, url=nats_server.url, retry_delay=0.3, max_deliver=3, ack_wait=5.0
            )
            stop = asyncio.Event()
            asyncio.get_running_loop().call_later(45, stop.set)  # the old code never idles
            await ingest.run(stop, idle_exit=6)
            return ingest

    t0 = time.monotonic()
    ingest = asyncio.run(scenario())
    assert time.monotonic() - t0 < 40, "the consumer never went idle"
    assert count_rows(cat_path) == (6, 6)
    assert ingest.counts.added == 6 and ingest.counts.dead == 1
    dead = asyncio.run(read_dead(nats_server.url))["moon/poison.jpg"]
    assert dead["Dead-Deliveries"] == "3"
    assert "database is locked" in dead["Dead-Reason"] and "3 deliveries" in dead["Dead-Reason"]


class OutageCatalog:
    """A catalog whose store goes down (every write and read raises ``StoreError``) for
    ``outage`` seconds, starting right after the first successful write; ``moon/poison.jpg``
    always fails with an error of no known kind."""

    def __init__(self, cat: Any, outage: float) -> None:
        self._cat = cat
        self._outage = outage
        self.down_until: float | None = None
        self.failed_while_down = 0

    def _down(self) -> bool:
        return self.down_until is not None and time.monotonic() < self.down_until

    def add_many(self, items, *args, **kwargs):
        if self._down():
            self.failed_while_down += 1
            raise StoreError("PostgreSQL cannot be reached: connection refused")
        if has_poison(items):
            raise RuntimeError("the store choked on moon/poison.jpg")
        out = self._cat.add_many(items, *args, **kwargs)
        if self.down_until is None:
            self.down_until = time.monotonic() + self._outage
        return out

    @property
    def settings(self) -> dict[str, str]:
        if self._down():
            raise StoreError("PostgreSQL cannot be reached: connection refused")
        return self._cat.settings

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cat, name)


def test_an_unavailable_store_counts_no_delivery_against_the_messages(
    nats_server,  # noqa: F811
    demo_dir,
    tmp_path,
):
    """The store goes down in the middle of a batch, after its first half was written, for
    longer than ``max_deliver`` deliveries take. Nothing it failed is the messages' fault:
    each image is written once the store is back, and only the poison is dead-lettered.
    (Before, the images that failed alongside the written half were counted, and with
    ``max_deliver=1`` dead-lettered at once.)"""
    asyncio.run(publish(nats_server.url, "images.in", image_messages(demo_dir, 7, 4)))
    cat_path = tmp_path / "cat"

    async def scenario() -> tuple[StreamIngest, OutageCatalog]:
        with lookalike.open_catalog(cat_path, extractor="cnn") as cat:
            flaky = OutageCatalog(cat, outage=3.0)
            ingest = StreamIngest(
                flaky,  # type: ignore[arg-type]
                url=nats_server.url,
                retry_delay=0.2,
                max_deliver=1,
                ack_wait=5.0,  # a lost negative acknowledgement comes back before idle_exit
            )
            stop = asyncio.Event()
            asyncio.get_running_loop().call_later(50, stop.set)
            await ingest.run(stop, idle_exit=6)
            return ingest, flaky

    ingest, flaky = asyncio.run(scenario())
    assert flaky.failed_while_down >= 3  # the outage met several deliveries
    assert count_rows(cat_path) == (7, 7)
    assert ingest.counts.added == 7 and ingest.counts.dead == 1
    dead = asyncio.run(read_dead(nats_server.url))
    assert set(dead) == {"moon/poison.jpg"}
    assert "RuntimeError" in dead["moon/poison.jpg"]["Dead-Reason"]
