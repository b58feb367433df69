"""Parsing of attribute values given as text (CLI ``key=value``, stream headers, CSV cells)."""

from __future__ import annotations

import re
from typing import Any


def parse_value(text: str) -> Any:
    """``"3"`` -> 3, ``"2.5"`` -> 2.5, ``"true"``/``"false"`` -> bool, ``"null"``/``"none"``/``""``
    -> None (removes the attribute), anything else -> the text itself."""
    low = text.strip().lower()
    if low in ("null", "none", ""):
        return None
    if low in ("true", "false"):
        return low == "true"
    if re.fullmatch(r"[-+]?\d+", text.strip()):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


def format_value(value: Any) -> str:
    """The inverse of :func:`parse_value` for str, int, float, bool and None."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
