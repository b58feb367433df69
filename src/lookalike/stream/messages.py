"""The wire format of lookalike's stream messages (broker-independent).

A message is a payload plus headers:

========================= ==================================================================
header                     meaning
========================= ==================================================================
``Lookalike-Kind``         ``image`` (default), ``listing`` (attribute update) or ``delete``
``Listing-Id``             the listing (required)
``Image-Id``               the image (required for ``image`` and ``delete``)
``Event-Time``             when the event happened, Unix seconds (float); optional
``Attr-<name>``            a listing attribute to set with the message, e.g.
                           ``Attr-stock_level: 3``; values are parsed like the CLI's
                           ``key=value`` (int, float, true/false, null removes, else text)
``Nats-Msg-Id``            set by the publisher to ``listing/image/sha256``: JetStream drops a
                           re-published duplicate inside its duplicate window
========================= ==================================================================

The payload of an ``image`` message is the encoded image file; ``listing`` and ``delete``
messages have an empty payload.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..values import format_value, parse_value

KIND = "Lookalike-Kind"
LISTING = "Listing-Id"
IMAGE = "Image-Id"
EVENT_TIME = "Event-Time"
ATTR_PREFIX = "Attr-"
KINDS = ("image", "listing", "delete")


class BadMessageError(ValueError):
    """A message that can never be processed (goes to the dead-letter subject)."""


@dataclass
class Event:
    """A parsed stream message.

    Attributes:
        kind: ``image``, ``listing`` or ``delete``.
        attrs: listing attributes carried by the message (None values remove).
        event_time: Unix seconds, or None.
    """

    kind: str
    listing_id: str
    image_id: str | None
    payload: bytes
    attrs: dict[str, Any] = field(default_factory=dict)
    event_time: float | None = None


def make_headers(
    kind: str,
    listing_id: str,
    image_id: str | None = None,
    attrs: Mapping[str, Any] | None = None,
    event_time: float | None = None,
) -> dict[str, str]:
    """Headers for a message (see the module docstring).

    Raises:
        ValueError: unknown kind, or a missing id.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}")
    if not listing_id or (kind != "listing" and not image_id):
        raise ValueError(
            f"a {kind} message needs listing_id" + ("" if kind == "listing" else " and image_id")
        )
    headers = {
        KIND: kind,
        LISTING: listing_id,
        EVENT_TIME: repr(time.time() if event_time is None else float(event_time)),
    }
    if image_id:
        headers[IMAGE] = image_id
    for name, value in (attrs or {}).items():
        headers[ATTR_PREFIX + name] = format_value(value)
    return headers


def parse_message(headers: Mapping[str, str] | None, payload: bytes, max_payload: int) -> Event:
    """Validate and parse a message.

    Raises:
        BadMessageError: missing/invalid headers, empty or oversized image payload (the message
            names what is wrong).
    """
    h = dict(headers or {})
    kind = h.get(KIND, "image").strip().lower()
    if kind not in KINDS:
        raise BadMessageError(f"unknown {KIND} {kind!r}")
    listing_id = h.get(LISTING, "").strip()
    image_id = h.get(IMAGE, "").strip() or None
    if not listing_id:
        raise BadMessageError(f"missing header {LISTING}")
    if kind != "listing" and not image_id:
        raise BadMessageError(f"missing header {IMAGE}")
    for key in (listing_id, image_id or ""):
        if len(key) > 1024 or any(ord(c) < 32 for c in key):
            raise BadMessageError("ids must be at most 1024 characters without control characters")
    if kind == "image":
        if not payload:
            raise BadMessageError("empty image payload")
        if len(payload) > max_payload:
            raise BadMessageError(
                f"payload of {len(payload)} bytes is over the {max_payload}-byte limit"
            )
    event_time = None
    if h.get(EVENT_TIME):
        try:
            event_time = float(h[EVENT_TIME])
        except ValueError:
            raise BadMessageError(f"{EVENT_TIME} is not a number: {h[EVENT_TIME]!r}") from None
    attrs = {
        k[len(ATTR_PREFIX) :]: parse_value(v)
        for k, v in h.items()
        if k.startswith(ATTR_PREFIX) and len(k) > len(ATTR_PREFIX)
    }
    return Event(kind, listing_id, image_id, payload, attrs, event_time)
