"""Reading ``features`` rows into :class:`~lookalike.types.ImageRecord` s, shared by the
backends (kept apart from the package so the backends do not import their own package)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..types import ImageRecord

#: The ``features`` columns every backend selects to build an :class:`ImageRecord`.
RECORD_COLUMNS = (
    "listing_id, image_id, vector, model, source, sha256, width, height, ingested_at, labels"
)


def record_from_row(r: Sequence[Any]) -> ImageRecord:
    """An :class:`ImageRecord` from a row of :data:`RECORD_COLUMNS`: the vector a float32
    blob (bytes or a buffer), the labels JSON text (SQLite) or already decoded (PostgreSQL
    JSONB)."""
    raw = r[9]
    labels = (json.loads(raw) if raw else None) if isinstance(raw, str) else raw
    return ImageRecord(
        listing_id=r[0],
        image_id=r[1],
        vector=np.frombuffer(bytes(r[2]), dtype="<f4").copy(),
        model=r[3],
        source=r[4],
        sha256=r[5],
        width=r[6],
        height=r[7],
        ingested_at=r[8],
        labels=labels,
    )
