"""A brute-force reference for the search semantics, written for clarity, not speed.

Tests use vectors whose entries are small multiples of 1/8, so every float32 inner product and
sum is exact: the engine and this oracle must then agree bit for bit, ties included.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def quantized(rng: np.random.Generator, n: int, d: int, levels: int = 4) -> np.ndarray:
    """``(n, d) float32`` with entries in {-levels..levels}/8 (exact float arithmetic)."""
    return (rng.integers(-levels, levels + 1, size=(n, d)) / 8).astype(np.float32)


def search(
    keys: Sequence[tuple[str, str]],
    vectors: np.ndarray,
    q: np.ndarray,
    *,
    k: int | None = 10,
    threshold: float | None = None,
    group_by: str | None = None,
    agg: str = "max",
    top_n: int = 3,
    listing_ok: Callable[[str], bool] = lambda lid: True,
) -> list[tuple[str, str, float]]:
    """``(listing_id, image_id, score)`` hits in the documented order."""
    scored = []
    for key, vec in zip(keys, vectors, strict=True):
        if not listing_ok(key[0]):
            continue
        score = float(sum(float(a) * float(b) for a, b in zip(vec, q, strict=True)))
        scored.append((key[0], key[1], score))
    if group_by == "listing":
        groups: dict[str, list[tuple[str, str, float]]] = {}
        for hit in scored:
            groups.setdefault(hit[0], []).append(hit)
        hits = []
        for lid, members in groups.items():
            members.sort(key=lambda h: (-h[2], h[1]))
            scores = [h[2] for h in members]
            if agg == "max":
                value = scores[0]
            elif agg == "mean":
                value = float(np.float32(sum(scores) / len(scores)))
            else:
                value = float(np.float32(sum(scores[:top_n])))
            hits.append((lid, members[0][1], value))
    else:
        hits = scored
    if threshold is not None:
        hits = [h for h in hits if h[2] > threshold]
    hits.sort(key=lambda h: (-h[2], h[0], h[1]))
    return hits if k is None else hits[:k]
