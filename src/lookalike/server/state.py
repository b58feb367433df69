"""What one server holds between requests: the catalog, its settings, metrics and map cache.

:func:`~lookalike.server.app.create_app` builds one :class:`ServerState` and puts it on
``app.state.server`` (and the catalog on ``app.state.catalog``); routes reach it only through
the dependencies in :mod:`lookalike.server.deps`, never through a closure or a global.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..catalog import Catalog
from .metrics import Metrics

#: Default largest upload, bytes.
DEFAULT_MAX_UPLOAD = 16 * 2**20
#: Points drawn by the map (a seeded sample above this).
MAP_MAX_POINTS = 20_000
#: Bytes a request body may carry beyond ``max_upload`` (form fields, multipart headers, a
#: JSON query vector); a body past ``max_upload + BODY_SLACK`` is refused while it streams.
BODY_SLACK = 2**20
#: Multipart limits: one file (the image) and a few option fields per request.
MAX_FILES = 1
MAX_FIELDS = 32


@dataclass(frozen=True)
class Settings:
    """How the server answers, fixed when the app is built.

    Attributes:
        token: bearer token the write endpoints require (None: writes are open).
        max_upload: largest accepted upload, bytes (413 above).
    """

    token: str | None = None
    max_upload: int = DEFAULT_MAX_UPLOAD

    @property
    def max_body(self) -> int:
        """Largest request body, bytes: ``max_upload`` plus room for the form fields."""
        return self.max_upload + BODY_SLACK


class MapCache:
    """The last ``GET /map`` answer, rebuilt when the collection or its analysis changes.

    The stamp is the vector cache's version, the limit and a digest of the stored analysis;
    a lock makes concurrent requests build the map once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stamp: tuple[Any, ...] | None = None
        self._body: dict[str, Any] = {}

    def get(
        self, cat: Catalog, limit: int, build: Callable[[Catalog, int], dict[str, Any]]
    ) -> dict[str, Any]:
        """The map of ``cat`` at ``limit`` points: cached, or made by ``build(cat, limit)``."""
        with self._lock:
            cache = cat.vector_cache() if cat.model is not None else None
            analysis = cat.analysis()
            digest = hash(
                frozenset((k, v.get("cluster"), v.get("x")) for k, v in list(analysis.items())[:64])
            )
            stamp = (cache.version if cache else -1, limit, len(analysis), digest)
            if stamp != self._stamp:
                self._body = build(cat, limit)
                self._stamp = stamp
            return self._body


@dataclass
class ServerState:
    """Everything a request handler may need, on ``app.state.server``."""

    catalog: Catalog
    settings: Settings
    metrics: Metrics
    map_cache: MapCache = field(default_factory=MapCache)
