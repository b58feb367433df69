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
route classes, body limit and 405s in :mod:`~lookalike.server.routing`, the OpenAPI
document in :mod:`~lookalike.server.openapi`, the
Prometheus metrics in :mod:`~lookalike.server.metrics`, the page in ``server/static``.

Endpoints (OpenAPI at ``/openapi.json``, Swagger UI at ``/docs``, its assets served from
the ``swagger-ui-bundle`` package, no CDN): ``POST /search`` (multipart upload or JSON),
``POST /images``, ``DELETE /images/{image_id}``, ``PUT /listings/{id}`` (writes: bearer
token when the server has one; so is ``POST /search`` with ``save=true``),
``GET /images/{image_id}``, ``GET /thumbnails/{image_id}`` (and the older
``GET /images/{image_id}/thumbnail``), ``GET /results/{query_id}``, ``GET /listings/{id}``,
``GET /stats``, ``GET /healthz``, ``GET /metrics``, ``GET /map``, ``GET /options``, the
watchlists (``/watchlists...``: :mod:`~lookalike.server.routes.watch`), ``GET /live``
(server-sent events: :mod:`~lookalike.server.routes.live`), and ``GET /``: the page. Reads
need the read token when the server has one (``/healthz``, the page's files and the docs stay
open). Errors are JSON ``{"error": {"status", "message"}}``
with the right 4xx/5xx code, a 500 included (:class:`~lookalike.server.routing.CatchAll`).

Limits, all checked before the work they guard: the token before the body is read; the
body's size from Content-Length, then while it streams (``max_upload`` + 1 MiB for an upload,
``max_json`` for anything else); an upload's pixel count from its header (``max_pixels``);
then at most ``max_decodes`` uploads are decoded and embedded at once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from ..catalog import Catalog, open_catalog
from ..images import MAX_UPLOAD_PIXELS
from . import errors, expiry, openapi, routing
from .metrics import CountRequests, Metrics
from .routes import ROUTERS
from .state import (
    DEFAULT_MAX_DECODES,
    DEFAULT_MAX_JSON,
    DEFAULT_MAX_UPLOAD,
    DEFAULT_RESULTS_TTL,
    MAP_MAX_POINTS,
    ServerState,
    Settings,
)

__all__ = [
    "DEFAULT_MAX_DECODES",
    "DEFAULT_MAX_JSON",
    "DEFAULT_MAX_UPLOAD",
    "DEFAULT_RESULTS_TTL",
    "MAP_MAX_POINTS",
    "MAX_UPLOAD_PIXELS",
    "STATIC",
    "create_app",
]

STATIC = Path(__file__).with_name("static")


def create_app(
    catalog: Catalog | str | os.PathLike[str],
    token: str | None = None,
    max_upload: int = DEFAULT_MAX_UPLOAD,
    *,
    read_token: str | None = None,
    max_pixels: int = MAX_UPLOAD_PIXELS,
    max_json: int = DEFAULT_MAX_JSON,
    max_decodes: int = DEFAULT_MAX_DECODES,
    results_ttl: float = DEFAULT_RESULTS_TTL,
) -> FastAPI:
    """Build the FastAPI application over ``catalog``.

    Args:
        catalog: an open catalog, or its location.
        token: bearer token required by the write endpoints and ``save=true`` (None: writes
            are open; ``LOOKALIKE_TOKEN`` is read by ``lookalike serve``).
        max_upload: largest accepted upload, bytes (413 above).
        read_token: bearer token required by every read endpoint (None: reads are open;
            ``LOOKALIKE_READ_TOKEN``); the write token is accepted for reads too.
        max_pixels: largest uploaded image, pixels (415 above, from the header).
        max_json: largest non-multipart body (JSON), bytes (413 above).
        max_decodes: uploads decoded and embedded at once.
        results_ttl: seconds saved search results are kept (default 7 days); older ones are
            deleted while the server runs (:mod:`lookalike.server.expiry`); 0 keeps them.

    Raises:
        ValueError: ``results_ttl`` is negative.
    """
    if not results_ttl >= 0:
        raise ValueError(f"results_ttl must be >= 0 seconds, not {results_ttl}")
    cat = catalog if isinstance(catalog, Catalog) else open_catalog(catalog)
    settings = Settings(
        token=token,
        max_upload=max_upload,
        read_token=read_token,
        max_pixels=max_pixels,
        max_json=max_json,
        max_decodes=max_decodes,
        results_ttl=results_ttl,
    )
    app = FastAPI(
        title="lookalike",
        version=_version(),
        description="Semantic image search: find the images and listings that look like a "
        "query image, a stored image or a vector.",
        docs_url=None,
        redoc_url=None,
        lifespan=expiry.lifespan,
    )
    app.state.server = ServerState(catalog=cat, settings=settings, metrics=Metrics(cat))
    app.state.catalog = cat
    errors.install(app)
    # Order, outermost first (the last added is the outermost): the metrics middleware counts
    # every answer, CatchAll turns an unanswered exception into the JSON 500 (counted too),
    # BodyLimit's 413 is raised from receive() straight into the handler.
    app.add_middleware(routing.BodyLimit, limit=settings.max_body, json_limit=max_json)
    app.add_middleware(routing.CatchAll)
    app.add_middleware(CountRequests)
    for router in ROUTERS:
        app.include_router(router)

    def document() -> dict[str, Any]:
        return openapi.document(app)

    app.openapi = document  # type: ignore[method-assign]

    app.add_api_route("/", _index, include_in_schema=False)
    app.add_api_route("/docs", _docs, include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/docs-assets", StaticFiles(directory=_swagger_ui()), name="docs-assets")
    return app


def _swagger_ui() -> Path:
    """The folder of Swagger UI's files (the ``swagger-ui-bundle`` package)."""
    from swagger_ui_bundle import swagger_ui_path  # type: ignore[import-untyped]

    return Path(str(swagger_ui_path))


def _docs() -> HTMLResponse:
    """``GET /docs``: Swagger UI over ``/openapi.json``, every asset served by this server."""
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="lookalike API",
        swagger_js_url="/docs-assets/swagger-ui-bundle.js",
        swagger_css_url="/docs-assets/swagger-ui.css",
        swagger_favicon_url="/docs-assets/favicon-32x32.png",
    )


def _index() -> RedirectResponse:
    """``GET /``: the web page."""
    return RedirectResponse("/static/index.html")


def _version() -> str:
    from .. import __version__

    return __version__
