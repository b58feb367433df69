"""What one server holds between requests: the catalog, its settings, metrics and map cache.

:func:`~lookalike.server.app.create_app` builds one :class:`ServerState` and puts it on
``app.state.server`` (and the catalog on ``app.state.catalog``); routes reach it only through
the dependencies in :mod:`lookalike.server.deps`, never through a closure or a global.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..analytics import ScoreBands, score_bands
from ..catalog import Catalog
from ..images import MAX_UPLOAD_PIXELS
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
#: Largest body that is not a multipart upload (JSON: a search, a listing's attributes), bytes.
#: A 1,280-float query vector is about 30 KB; the schema's longest vector (65,536 floats at
#: up to ~25 characters each) still fits in 2 MiB.
DEFAULT_MAX_JSON = 2 * 2**20
#: Default number of uploads decoded and embedded at once (more wait their turn): the cores.
DEFAULT_MAX_DECODES = os.cpu_count() or 1
#: Default retention of saved search results (``save=true``), seconds: 7 days.
DEFAULT_RESULTS_TTL = 7 * 86400.0


@dataclass(frozen=True)
class Settings:
    """How the server answers, fixed when the app is built.

    Attributes:
        token: bearer token the write endpoints require (None: writes are open), and
            ``POST /search`` with ``save=true``; it grants reads too.
        max_upload: largest accepted upload, bytes (413 above).
        read_token: bearer token every read endpoint requires (None: reads are open);
            ``/healthz``, the page's static files, ``/docs`` and ``/openapi.json`` stay open.
        max_pixels: largest uploaded image, pixels (415 above, read from the header).
        max_json: largest body that is not a multipart upload, bytes (413 above).
        max_decodes: uploads decoded and embedded at once; more wait their turn.
        results_ttl: seconds a saved search result is kept; the server deletes older ones
            (:mod:`lookalike.server.expiry`); 0 keeps them forever.
    """

    token: str | None = None
    max_upload: int = DEFAULT_MAX_UPLOAD
    read_token: str | None = None
    max_pixels: int = MAX_UPLOAD_PIXELS
    max_json: int = DEFAULT_MAX_JSON
    max_decodes: int = DEFAULT_MAX_DECODES
    results_ttl: float = DEFAULT_RESULTS_TTL

    @property
    def max_body(self) -> int:
        """Largest request body, bytes: ``max_upload`` plus room for the form fields."""
        return self.max_upload + BODY_SLACK


class MapCache:
    """The ``GET /map`` answer, built once per change of the collection or its analysis at
    ``size`` points, and sampled from for a smaller ``limit`` (no rebuild per limit).

    The stamp is the vector cache's model and version and a digest of the stored analysis; a
    lock makes concurrent requests build the map once.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.builds = 0
        self._lock = threading.Lock()
        self._stamp: tuple[Any, ...] | None = None
        self._body: dict[str, Any] = {}

    def get(
        self, cat: Catalog, limit: int, build: Callable[[Catalog, int], dict[str, Any]]
    ) -> dict[str, Any]:
        """The map of ``cat`` at most ``limit`` points: a seeded sample (in map order) of
        the cached map, which is made by ``build(cat, size)`` when the catalog changed."""
        with self._lock:
            cache = cat.vector_cache() if cat.model is not None else None
            analysis = cat.analysis()
            digest = hash(
                frozenset((k, v.get("cluster"), v.get("x")) for k, v in list(analysis.items())[:64])
            )
            # with the model: a reindex starts a new cache, whose versions start again
            model = cache.model if cache else ""
            stamp = (model, cache.version if cache else -1, len(analysis), digest)
            if stamp != self._stamp:
                self._body = build(cat, self.size)
                self._stamp = stamp
                self.builds += 1
            body = self._body
        points = body["points"]
        if limit >= len(points):
            return body
        keep = np.sort(np.random.default_rng(0).choice(len(points), limit, replace=False))
        return {**body, "points": [points[i] for i in keep]}


class BandsCache:
    """The catalog's score bands (:func:`lookalike.analytics.score_bands`), measured at most
    once per ``ttl`` seconds or when the stored calibration changes: the "similar" limit
    samples the vectors, too slow to redo per search and slow to drift."""

    def __init__(self, ttl: float = 60.0) -> None:
        self.ttl = ttl
        self._lock = threading.Lock()
        self._stamp: tuple[Any, ...] | None = None
        self._at = 0.0
        self._bands: ScoreBands | None = None

    def get(self, cat: Catalog) -> ScoreBands:
        """The bands of ``cat`` (cached).

        Raises:
            LookalikeError: the catalog is empty.
        """
        with self._lock:
            cal = cat.calibration() or {}
            model = cat.model
            stamp = (model.tag if model else None, cal.get("created_at"))
            now = time.monotonic()
            if self._bands is None or stamp != self._stamp or now - self._at > self.ttl:
                self._bands = score_bands(cat)
                self._stamp, self._at = stamp, now
            return self._bands


class Slots:
    """At most ``n`` holders at once (an asyncio semaphore per event loop, so one app may be
    served by several loops, as test clients do): bounds concurrent decodes + model calls."""

    def __init__(self, n: int) -> None:
        self.n = max(1, n)
        self._sems: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """Wait for a slot, hold it for the ``async with`` body."""
        loop = asyncio.get_running_loop()
        sem = self._sems.get(loop)
        if sem is None:
            sem = self._sems.setdefault(loop, asyncio.Semaphore(self.n))
        async with sem:
            yield


@dataclass
class ServerState:
    """Everything a request handler may need, on ``app.state.server``."""

    catalog: Catalog
    settings: Settings
    metrics: Metrics
    map_cache: MapCache = field(default_factory=lambda: MapCache(MAP_MAX_POINTS))
    bands: BandsCache = field(default_factory=BandsCache)
    decodes: Slots = field(init=False)

    def __post_init__(self) -> None:
        self.decodes = Slots(self.settings.max_decodes)
