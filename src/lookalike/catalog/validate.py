"""Checks on what callers hand the catalog, so every store gets only what it can hold and every
face (CLI, HTTP, stream) refuses bad input with the same :class:`~lookalike.errors.QueryError`.

* ids: the one rule is :func:`lookalike.types.id_problem` (non-empty, at most
  :data:`~lookalike.types.MAX_ID_LENGTH` characters, no control, surrogate or bidi
  override/isolate characters); :func:`check_id` applies it on every write path.
* listing attributes (:func:`check_listing_attrs`): names non-empty, at most
  :data:`MAX_ATTR_NAME_LENGTH` characters, without control characters, not ``listing_id``;
  values None (removes), bool, int in the int64 range, finite float, or a str of at most
  :data:`MAX_ATTR_TEXT_LENGTH` characters without control characters. ``stock_level`` is a
  whole number (a stored column of both stores); ``etag`` is text (an int is stored as its
  decimal text, as both stores always did).
* messages name the catalog by :func:`catalog_name` (folder basename, database name), never
  by an absolute server path or a URL.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import QueryError
from ..types import id_problem, text_problem

#: Longest listing attribute name, in characters.
MAX_ATTR_NAME_LENGTH = 128
#: Longest str attribute value, in characters.
MAX_ATTR_TEXT_LENGTH = 4096
#: The int64 range every store can hold (SQLite INTEGER, PostgreSQL BIGINT).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_WHOLE = re.compile(r"\s*[-+]?\d+\s*")


def check_id(value: object, what: str = "id") -> str:
    """``value`` when it is an acceptable id (see :func:`lookalike.types.id_problem`).

    Raises:
        QueryError: it is not, saying why.
    """
    problem = id_problem(value, what)
    if problem is not None:
        raise QueryError(problem)
    assert isinstance(value, str)
    return value


def check_lookup_id(value: object, what: str = "id") -> str:
    """``value`` when it can be looked up: a string that a store can be asked about (no NUL,
    no lone surrogate). Looser than :func:`check_id` so rows stored before the id rule stay
    reachable.

    Raises:
        QueryError: not a string, or not representable in any store.
    """
    if not isinstance(value, str):
        raise QueryError(f"{what} must be a string, not {type(value).__name__}")
    if "\x00" in value or any("\ud800" <= ch <= "\udfff" for ch in value):
        shown = repr(value) if len(value) <= 60 else repr(value[:60]) + "..."
        raise QueryError(f"{what} {shown} {text_problem(value)}; no id can contain it")
    return value


def _check_int(name: str, value: int) -> int:
    if not INT64_MIN <= value <= INT64_MAX:
        raise QueryError(
            f"listing attribute {name!r}: integer {value} is outside the int64 range "
            f"[{INT64_MIN}, {INT64_MAX}]"
        )
    return value


def _check_value(name: str, value: Any) -> Any:
    """The value to store for attribute ``name`` (raises QueryError when refused)."""
    if value is None:
        return None
    if name == "stock_level":
        return _check_stock_level(value)
    if isinstance(value, bool):
        if name == "etag":
            raise QueryError("listing attribute 'etag' must be text, not a bool")
        return value
    if isinstance(value, int):
        value = _check_int(name, int(value))
        return str(value) if name == "etag" else value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise QueryError(
                f"listing attribute {name!r}: {value} is refused; numbers must be finite "
                "(no NaN or infinity)"
            )
        if name == "etag":
            raise QueryError("listing attribute 'etag' must be text, not a float")
        return float(value)
    if isinstance(value, str):
        if len(value) > MAX_ATTR_TEXT_LENGTH:
            raise QueryError(
                f"listing attribute {name!r}: text of {len(value)} characters; the limit is "
                f"{MAX_ATTR_TEXT_LENGTH}"
            )
        problem = text_problem(value)
        if problem is not None:
            raise QueryError(f"listing attribute {name!r}: the text {problem}")
        return value
    raise QueryError(
        f"listing attribute {name!r} must be str, number, bool or null, not {type(value).__name__}"
    )


def _check_stock_level(value: Any) -> int:
    """``stock_level`` is an integer column in both stores: a whole number in int64 range
    (an integral float or a str of digits is taken as that integer, as the stores did)."""
    integral = isinstance(value, float) and math.isfinite(value) and value.is_integer()
    digits = isinstance(value, str) and len(value) <= 64 and _WHOLE.fullmatch(value) is not None
    if isinstance(value, bool) or not (isinstance(value, int) or integral or digits):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:60] + "..."
        raise QueryError(
            f"listing attribute 'stock_level' must be a whole number, got {shown} "
            f"({type(value).__name__})"
        )
    return _check_int("stock_level", int(value))


def check_attr_name(name: object) -> str:
    """``name`` when it is an acceptable listing attribute name.

    Raises:
        QueryError: not a str, empty or only whitespace, longer than
            :data:`MAX_ATTR_NAME_LENGTH`, with a control character, or ``listing_id``.
    """
    if not isinstance(name, str):
        raise QueryError(f"listing attribute names must be strings, not {type(name).__name__}")
    if not name.strip():
        raise QueryError(f"listing attribute name must not be empty or only whitespace ({name!r})")
    shown = repr(name) if len(name) <= 60 else repr(name[:60]) + "..."
    if len(name) > MAX_ATTR_NAME_LENGTH:
        raise QueryError(
            f"listing attribute name {shown} is {len(name)} characters long; the limit is "
            f"{MAX_ATTR_NAME_LENGTH}"
        )
    problem = text_problem(name)
    if problem is not None:
        raise QueryError(f"listing attribute name {shown} {problem}")
    if name == "listing_id":
        raise QueryError("'listing_id' is the listing's key, not an attribute; it cannot be set")
    return name


def check_listing_attrs(attrs: Mapping[Any, Any]) -> dict[str, Any]:
    """The attributes to store, checked (see the module docstring); None values remove.

    Raises:
        QueryError: the first refused name or value, saying what is refused and why.
    """
    return {check_attr_name(name): _check_value(name, value) for name, value in attrs.items()}


def catalog_name(uri: str) -> str:
    """How messages name a catalog: the folder's basename, or a PostgreSQL database's name;
    never the absolute path or the URL (host, user)."""
    if "://" in uri:
        path = urlsplit(uri).path.strip("/")
        return path.rsplit("/", 1)[-1] or "postgresql"
    return Path(uri).name or Path(uri).resolve().name or "catalog"
