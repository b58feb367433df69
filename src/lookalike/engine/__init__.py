"""The search engine: an in-RAM vector cache synced from the store, and the search over it.

The engine knows nothing of files, models or HTTP: it sees ``(n, d) float32`` vectors, keys,
listing numbers and listing attributes. Its modules:

* ``protocol.py``: :class:`SearchEngine`, what every engine offers (``make_engine`` returns one);
* ``cache.py``: :class:`VectorCache` (with its immutable snapshots) and :class:`ListingTable`;
* ``mapped.py``: the cache's rows in files beside the catalog, memory-mapped by a new process;
* ``coalesce.py``: concurrent calls served by one batch call (concurrent searches);
* ``checks.py``: validation of specs, queries and listing masks (:func:`check_spec`, ...);
* ``ranking.py``: the search semantics (thresholds, aggregation, tie order), shared by all;
* ``filters.py``: ``where`` expressions over listing attributes (:func:`parse_where`);
* ``columns.py``: listing attributes as typed columns, the vectorized comparisons of ``where``;
* ``numpy_engine.py``: :class:`NumpyEngine`, the reference (oracle) implementation;
* ``codes.py``, ``refine.py``, ``fast.py``: the compiled engine :class:`FastEngine` (int8 /
  float16 / float32 codes scanned by ``_kernels.c``, exact re-scoring with a proof);
* ``gpu.py``: :class:`TorchEngine`, the same loop with the scan on a torch device;
* ``ann.py``: faiss indexes and :class:`AnnEngine` (approximate).

:func:`make_engine` picks one: torch on a CUDA GPU, else the fast engine when its C extension
is built, else numpy (with a warning). Only this module, ``numpy_engine``, ``ann`` and the
modules they import work without the compiled extension.
"""

from __future__ import annotations

import logging
import warnings

from ..errors import LookalikeError, optional_import
from ..types import Aggregation, CodeKind, EngineKind, RawHits, SearchSpec, choices
from .cache import ListingTable, VectorCache
from .checks import check_listing_mask, check_queries, check_spec
from .filters import Expr, parse_where
from .numpy_engine import NumpyEngine
from .protocol import SearchEngine

log = logging.getLogger(__name__)

#: Engines :func:`make_engine` knows (``EngineKind`` values as plain strings).
ENGINES: tuple[str, ...] = choices(EngineKind)
#: Code kinds of the fast engine (``CodeKind`` values as plain strings).
CODES: tuple[str, ...] = choices(CodeKind)
#: Per-listing aggregations (``Aggregation`` values as plain strings).
AGGREGATIONS: tuple[str, ...] = choices(Aggregation)


def kernels_available() -> tuple[bool, str]:
    """Whether the compiled scan kernels import, and why not (the ImportError's message)."""
    try:
        from . import _kernels  # noqa: F401
    except ImportError as exc:
        return False, str(exc)
    return True, ""


def make_engine(
    cache: VectorCache,
    engine: str = "auto",
    codes: str = "int8",
    rerank: int = 4,
    device: str | None = None,
) -> SearchEngine:
    """Build the exact search engine for ``cache``.

    Args:
        cache: the vector cache.
        engine: ``auto`` (torch on a CUDA GPU when one is present, else the compiled CPU
            kernels, else numpy with a warning), ``fast``, ``numpy``, or ``torch``
            (:class:`~lookalike.types.EngineKind`).
        codes: code kind of the fast engine (``int8``, ``float16``, ``float32``;
            :class:`~lookalike.types.CodeKind`).
        rerank: candidates per requested hit before the exactness check.
        device: torch device for ``engine="torch"`` (default ``cuda``).

    Raises:
        LookalikeError: unknown engine or codes, or ``fast``/``torch`` requested but unavailable.
    """
    if engine not in ENGINES:
        raise LookalikeError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    if codes not in CODES:
        raise LookalikeError(f"unknown codes {codes!r}; use one of {', '.join(CODES)}")
    if engine == EngineKind.NUMPY:
        return NumpyEngine(cache)
    ok, why = kernels_available()
    if engine == EngineKind.TORCH or (engine == EngineKind.AUTO and ok and _cuda()):
        if not ok:
            raise LookalikeError(f"the torch engine needs the compiled kernels too: {why}")
        optional_import("torch", "gpu", "the torch engine")
        from .gpu import TorchEngine

        return TorchEngine(cache, device=device or "cuda", rerank=rerank)
    if not ok:
        if engine == EngineKind.FAST:
            raise LookalikeError(f"compiled scan kernels unavailable: {why}")
        msg = (
            f"lookalike: compiled scan kernels unavailable ({why}); searching with numpy "
            "(exact, slower). Reinstall with a C compiler to build them."
        )
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        log.warning(msg)
        return NumpyEngine(cache)
    from .fast import FastEngine

    return FastEngine(cache, codes=codes, rerank=rerank)


def engine_name(engine: str = "auto") -> str:
    """The name (``numpy``, ``fast`` or ``torch``) of the engine :func:`make_engine` builds for
    ``engine``, without building it (nothing is loaded: ``lookalike stats`` reports it).

    Raises:
        LookalikeError: unknown engine.
    """
    if engine not in ENGINES:
        raise LookalikeError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    if engine == EngineKind.NUMPY:
        return EngineKind.NUMPY.value
    ok, _ = kernels_available()
    if engine == EngineKind.TORCH or (engine == EngineKind.AUTO and ok and _cuda()):
        return EngineKind.TORCH.value
    if engine == EngineKind.FAST or ok:
        return EngineKind.FAST.value
    return EngineKind.NUMPY.value


def _cuda() -> bool:
    from ..devices import cuda_available

    return cuda_available()


__all__ = [
    "AGGREGATIONS",
    "CODES",
    "ENGINES",
    "Expr",
    "ListingTable",
    "NumpyEngine",
    "RawHits",
    "SearchEngine",
    "SearchSpec",
    "VectorCache",
    "check_listing_mask",
    "check_queries",
    "check_spec",
    "engine_name",
    "kernels_available",
    "make_engine",
    "parse_where",
]
