"""What schemathesis needs to know of lookalike's OpenAPI document beyond JSON Schema: how to
draw a valid image part and a valid ``where`` expression (format ``lookalike-where``).

No JSON Schema can say "a decodable image" or "a sentence of this grammar", so the document
declares them as media types (the ``encoding`` of an upload's ``image`` part) and a format;
these strategies give schemathesis values of both, so a schema-valid request it draws is one
the server must accept. ``tests/test_server.py`` imports this module; the command line uses
it the same way::

    PYTHONPATH=tests SCHEMATHESIS_HOOKS=contract_hooks \\
        schemathesis run http://127.0.0.1:8000/openapi.json --checks all ...

Registering is global to the process (schemathesis keeps one registry), and idempotent.
"""

from __future__ import annotations

import io
from typing import Any

import schemathesis
from hypothesis import strategies as st
from PIL import Image

#: Media type -> Pillow format of the images drawn for it (those the document lists).
FORMATS = {
    "image/jpeg": "JPEG",
    "image/png": "PNG",
    "image/webp": "WEBP",
    "image/gif": "GIF",
    "image/bmp": "BMP",
}
#: Listing attributes every demo catalog has (``where`` may only name known ones: an unknown
#: attribute is a 400, which is right).
WHERE_NAMES = ("stock_level", "category", "listing_id")


def _encode(fmt: str, size: tuple[int, int], color: tuple[int, int, int], noise: int) -> bytes:
    """A small RGB image of one colour and a diagonal band, encoded as ``fmt``."""
    img = Image.new("RGB", size, color)
    w, h = size
    for i in range(min(w, h)):
        img.putpixel((i, i), ((noise + i * 37) % 256, noise % 256, (noise * 7) % 256))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def images(fmt: str) -> st.SearchStrategy[bytes]:
    """Valid ``fmt`` files of 8-64 px a side."""
    side = st.integers(8, 64)
    rgb = st.tuples(*[st.integers(0, 255)] * 3)
    return st.builds(_encode, st.just(fmt), st.tuples(side, side), rgb, st.integers(0, 255))


def _quoted(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


_text = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=12)
_number = st.integers(-(10**6), 10**6).map(str) | st.floats(
    -1e6, 1e6, allow_nan=False, allow_infinity=False
).map(repr)
_literal = _number | _text.map(_quoted) | st.sampled_from(["true", "false"])
_literals = st.lists(_literal, min_size=1, max_size=4)
_name = st.sampled_from(WHERE_NAMES)
_op = st.sampled_from(["=", "==", "!=", "<>", "<", "<=", ">", ">="])
_comparison = (
    st.tuples(_name, _op, _literal).map(" ".join)
    | st.tuples(_name, st.sampled_from(["in", "not in"]), _literals).map(
        lambda t: f"{t[0]} {t[1]} ({', '.join(t[2])})"
    )
    | st.tuples(_name, st.sampled_from(["is null", "is not null", "IS NULL"])).map(" ".join)
)


def _combine(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return (
        st.tuples(inner, st.sampled_from(["and", "or", "AND"]), inner).map(" ".join)
        | inner.map(lambda e: f"not ({e})")
        | inner.map(lambda e: f"({e})")
    )


#: Sentences of the ``where`` grammar (lookalike.engine.filters) over :data:`WHERE_NAMES`,
#: and blank strings (no filter).
WHERE = st.recursive(_comparison, _combine, max_leaves=6) | st.sampled_from(["", " "])


def register() -> None:
    """Register the image media types and the ``lookalike-where`` format."""
    for media_type, fmt in FORMATS.items():
        schemathesis.openapi.media_type(media_type, images(fmt))
    schemathesis.openapi.format("lookalike-where", WHERE.filter(lambda s: len(s) <= 2000))


register()


@schemathesis.hook
def filter_case(context: schemathesis.HookContext, case: schemathesis.Case) -> bool:
    """Drop two kinds of mislabelled multipart cases of schemathesis 4.32:

    * its coverage phase's "Multipart body with custom encoding" fills every required part
      without a media-type strategy with "" (whatever that part's schema says, e.g.
      ``minLength: 1``) and calls the body positive, so ``positive_data_acceptance`` would hold
      the server's 422 against it;
    * a negative body whose field became an empty list: a form sends no part for it, which is
      the field left out, a valid request, so ``negative_data_rejection`` would hold the
      server's 200 against it.
    """
    if case.media_type != "multipart/form-data" or not isinstance(case.body, dict):
        return True
    if any(value == [] for value in case.body.values()):
        return False
    data = getattr(case.meta.phase, "data", None) if case.meta is not None else None
    if getattr(data, "description", None) == "Multipart body with custom encoding":
        return "" not in case.body.values()
    return True


#: Seconds a ``GET /live`` stream of the contract run lasts (see :func:`before_call`).
LIVE_SECONDS = 0.2


@schemathesis.hook
def before_call(
    context: schemathesis.HookContext, case: schemathesis.Case, kwargs: dict[str, Any]
) -> None:
    """Let ``GET /live`` streams end soon, by the server's own ``max_seconds`` parameter: a
    valid value (in (0, 25]) becomes at most :data:`LIVE_SECONDS`, a missing one is added; an
    invalid one (the negative cases) is left as drawn. Every valid case still streams (the
    run asks for ``text/event-stream``, ``tests/contract.toml``) until the server ends it,
    without waiting out the server's 25 s."""
    if case.operation.path != "/live" or case.operation.method.lower() != "get":
        return
    query = dict(case.query or {})
    drawn = query.get("max_seconds", LIVE_SECONDS)
    try:
        seconds = None if isinstance(drawn, bool) else float(drawn)
    except (TypeError, ValueError):
        seconds = None
    if seconds is not None and 0 < seconds <= 25:
        query["max_seconds"] = min(seconds, LIVE_SECONDS)
        case.query = query
