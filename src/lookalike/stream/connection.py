"""The NATS connection shared by the consumer and the publisher: connect (with one-line
connection events instead of nats-py's tracebacks), make sure a stream exists, and turn a
broker failure into the project's error."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ..errors import BrokerError, LookalikeError, translate

log = logging.getLogger(__name__)

DEFAULT_URL = "nats://127.0.0.1:4222"
DEFAULT_STREAM = "LOOKALIKE"
#: Seconds within which an identical connection-event line is not repeated.
REPEAT_EVERY_S = 10.0

#: Receives one line for the operator.
Notify = Callable[[str], None]


class OneLine:
    """Reports connection events as one line each through ``notify``; an identical line is
    repeated at most every :data:`REPEAT_EVERY_S` seconds (a reconnect loop tries twice a
    second)."""

    def __init__(self, url: str, notify: Notify | None, client: Any = None) -> None:
        self.url, self.client = url, client
        self.notify = notify or (lambda text: log.warning("%s", text))
        self.last: dict[str, float] = {}

    def __call__(self, text: str) -> None:
        now = time.monotonic()
        if now - self.last.get(text, -1e9) >= REPEAT_EVERY_S:
            self.last[text] = now
            self.notify(text)

    def callbacks(self) -> dict[str, Callable[..., Awaitable[None]]]:
        """nats-py's ``error_cb``, ``disconnected_cb`` and ``reconnected_cb`` (its default
        error callback logs a full traceback for every failed attempt)."""

        async def error_cb(exc: Exception) -> None:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            self(f"NATS {self.url}: {type(exc).__name__}: {reason}")

        async def disconnected_cb() -> None:
            if self.client is not None and self.client.is_closed:
                return  # our own close(), not an outage
            self(f"NATS {self.url}: disconnected; reconnecting")

        async def reconnected_cb() -> None:
            self.last.clear()  # the next outage is reported again
            self.notify(f"NATS {self.url}: reconnected")

        return {
            "error_cb": error_cb,
            "disconnected_cb": disconnected_cb,
            "reconnected_cb": reconnected_cb,
        }


async def connect(
    url: str,
    name: str = "lookalike",
    *,
    attempts: int | None = None,
    timeout: float = 5.0,
    notify: Notify | None = None,
) -> Any:
    """Connect to NATS.

    Args:
        url: the server.
        name: the client name the server shows.
        attempts: None (the consumer): retry the connect and every reconnect forever (a broker
            restart is survived, not fatal). A number (the publisher): give up after that many
            failed attempts, so an unreachable server fails in bounded time
            (``attempts * (timeout + 0.5)`` seconds at most).
        timeout: seconds one connect attempt may take.
        notify: receives one line per connection event (default: a warning in the log).
    """
    from nats.aio.client import Client

    nc: Any = Client()  # typed loosely: nats-py annotates float options as int
    events = OneLine(url, notify, nc)
    await nc.connect(
        servers=[url],
        name=name,
        reconnect_time_wait=0.5,
        # nats-py: 0 would mean forever; n > 0 means n + 1 attempts in all
        max_reconnect_attempts=-1 if attempts is None else max(1, attempts - 1),
        connect_timeout=timeout,
        allow_reconnect=True,
        **events.callbacks(),
    )
    return nc


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


def stream_subject(subject: str) -> str:
    """The subject a stream should capture for a publish/consume subject."""
    head = subject.split(".")[0]
    return f"{head}.>" if head != subject else subject
