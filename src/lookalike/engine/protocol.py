"""The search-engine protocol: what every engine (numpy, fast, torch, ANN) offers its callers.

Callers (the catalog, the benchmarks) hold a :class:`SearchEngine` and use only these members;
they never probe an engine with ``getattr``. Every implementation answers with the semantics of
``ranking.py``; the exact ones (``exact`` True) return the same lists as
:class:`~lookalike.engine.numpy_engine.NumpyEngine`, the oracle of the behavioural tests.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy.typing as npt

from ..types import CodeKind, RawHits, SearchSpec
from .cache import VectorCache


@runtime_checkable
class SearchEngine(Protocol):
    """A search over a :class:`VectorCache`.

    Attributes:
        name: short engine name (``numpy``, ``fast``, ``torch``, ``ann``), shown in stats.
        cache: the vector cache searched (the engine follows its changes on each search).
        code_kind: what the scan reads (``int8``, ``float16``, ``float32``); ``float32`` for
            engines that read the cache's vectors themselves (numpy, torch, ANN re-scoring).
        exact: True when every answer equals exact search; False for ANN indexes.
    """

    @property
    def name(self) -> str:
        """Short engine name."""
        ...

    @property
    def cache(self) -> VectorCache:
        """The vector cache searched."""
        ...

    @property
    def code_kind(self) -> CodeKind:
        """What the scan reads."""
        ...

    @property
    def exact(self) -> bool:
        """Whether answers equal exact search."""
        ...

    def nbytes(self) -> int:
        """Bytes the engine holds beyond the cache (codes, indexes, device copies; 0 for
        numpy). May bring derived structures up to date with the cache first."""
        ...

    def search(self, queries: npt.ArrayLike, spec: SearchSpec) -> list[RawHits]:
        """Search ``(nq, d)`` (or one ``(d,)``) float32 queries; one :class:`RawHits` per query,
        best first, scores exact float32 inner products.

        Raises:
            QueryError: a bad query (dimension, rank, NaN/inf), spec or listing mask.
        """
        ...


__all__ = ["SearchEngine"]
