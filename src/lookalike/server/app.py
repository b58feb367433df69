"""The HTTP API (FastAPI) and the web page, over one :class:`~lookalike.catalog.Catalog`:
:func:`create_app` assembles them and owns nothing else.

One process holds the catalog (and its in-RAM engine); searches run in FastAPI's thread pool
and are served while writes (uploads, the stream, another process) go on: SQLite in WAL mode
lets readers read during a write, and the engine applies new rows incrementally under a short
lock before each search.

Where things live: the routers in :mod:`lookalike.server.routes` (``search``, ``images``,
``listings``, ``facts``), the dependencies in :mod:`~lookalike.server.deps`, the state they
read in :mod:`~lookalike.server.state`, every request/response schema in
:mod:`~lookalike.server.schemas`, the error table in :mod:`~lookalike.server.errors`, the
route classes, body limit and OpenAPI merge in :mod:`~lookalike.server.routing`, the
Prometheus metrics in :mod:`~lookalike.server.metrics`, the page in ``server/static``.

Endpoints (OpenAPI at ``/openapi.json``, docs at ``/docs``): ``POST /search`` (multipart
upload or JSON), ``POST /images``, ``DELETE /images/{image_id}``, ``PUT /listings/{id}``
(writes: bearer token when the server has one), ``GET /images/{image_id}``,
``GET /images/{image_id}/thumbnail``, ``GET /listings/{id}``, ``GET /stats``,
``GET /healthz``, ``GET /metrics``, ``GET /map``, ``GET /options``, and ``GET /``: the page.
Errors are JSON ``{"error": {"status", "message"}}`` with the right 4xx/5xx code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from ..catalog import Catalog, open_catalog
from . import errors, routing
from .metrics import Metrics, count_requests
from .routes import ROUTERS
from .state import DEFAULT_MAX_UPLOAD, MAP_MAX_POINTS, ServerState, Settings

__all__ = ["DEFAULT_MAX_UPLOAD", "MAP_MAX_POINTS", "STATIC", "create_app"]

STATIC = Path(__file__).with_name("static")


def create_app(
    catalog: Catalog | str | os.PathLike[str],
    token: str | None = None,
    max_upload: int = DEFAULT_MAX_UPLOAD,
) -> FastAPI:
    """Build the FastAPI application over ``catalog``.

    Args:
        catalog: an open catalog, or its location.
        token: bearer token required by the write endpoints (None: writes are open;
            ``LOOKALIKE_TOKEN`` is read by ``lookalike serve``).
        max_upload: largest accepted upload, bytes (413 above).
    """
    cat = catalog if isinstance(catalog, Catalog) else open_catalog(catalog)
    settings = Settings(token=token, max_upload=max_upload)
    app = FastAPI(
        title="lookalike",
        version=_version(),
        description="Semantic image search: find the images and listings that look like a "
        "query image, a stored image or a vector.",
    )
    app.state.server = ServerState(catalog=cat, settings=settings, metrics=Metrics(cat))
    app.state.catalog = cat
    errors.install(app)
    # BodyLimit sits inside the metrics middleware (the last added is the outermost): its 413
    # is raised from receive() straight into the handler, and still counted.
    app.add_middleware(routing.BodyLimit, limit=settings.max_body)
    app.middleware("http")(count_requests)
    for router in ROUTERS:
        app.include_router(router)

    def openapi() -> dict[str, Any]:
        return routing.openapi(app)

    app.openapi = openapi  # type: ignore[method-assign]

    app.add_api_route("/", _index, include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _index() -> RedirectResponse:
    """``GET /``: the web page."""
    return RedirectResponse("/static/index.html")


def _version() -> str:
    from .. import __version__

    return __version__
