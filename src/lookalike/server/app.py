"""The HTTP API (FastAPI) and the web page, over one :class:`~lookalike.catalog.Catalog`.

One process holds the catalog (and its in-RAM engine); searches run in FastAPI's thread pool
and are served while writes (uploads, the stream, another process) go on: SQLite in WAL mode
lets readers read during a write, and the engine applies new rows incrementally under a short
lock before each search.

Endpoints (OpenAPI at ``/openapi.json``, docs at ``/docs``):

* ``POST /search``: multipart with the image in field ``image`` and options as form fields,
  or JSON with ``image_id`` (+ ``listing_id``) or ``vector``; answers
  ``{"query_id", "hits": [{"listing_id", "image_id", "score", "rank", "thumbnail_url"}]}``;
* ``POST /images``, ``DELETE /images/{image_id}``, ``PUT /listings/{listing_id}``: writes,
  protected by a bearer token when the server has one;
* ``GET /images/{image_id}``, ``GET /images/{image_id}/thumbnail``, ``GET /listings/{id}``,
  ``GET /stats``, ``GET /healthz``, ``GET /metrics`` (Prometheus text), ``GET /map``;
* ``GET /``: the web page (static files in ``server/static``, nothing from a CDN).

Errors are JSON ``{"error": {"status", "message"}}`` with the right 4xx code.
"""

from __future__ import annotations

import hmac
import os
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, File, Form, Header, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..analytics.projection import map_points
from ..catalog import Catalog, open_catalog
from ..errors import ImageError, LookalikeError, ModelMismatchError, NotFoundError
from ..types import SearchResult
from .metrics import Metrics

STATIC = Path(__file__).with_name("static")
#: Default largest upload, bytes.
DEFAULT_MAX_UPLOAD = 16 * 2**20
#: Points drawn by the map (a seeded sample above this).
MAP_MAX_POINTS = 20_000


# ------------------------------------------------------------------------------------ models


class Hit(BaseModel):
    """One search hit."""

    listing_id: str
    image_id: str
    score: float = Field(description="Inner product with the query (cosine), in [-1, 1].")
    rank: int
    n_images: int | None = Field(None, description="Grouped hits: images scored in the listing.")
    thumbnail_url: str


class SearchResponse(BaseModel):
    """The same JSON as ``lookalike search --format json``, with thumbnail URLs."""

    query_id: str
    hits: list[Hit]


class SearchOptions(BaseModel):
    """Search options (JSON body of ``POST /search``; form fields with an upload)."""

    k: int | None = Field(None, ge=1, le=10_000, description="Hits (default 10).")
    group_by: Literal["listing"] | None = None
    agg: Literal["max", "mean", "sum-top-n"] = "max"
    top_n: int = Field(3, ge=1, le=64)
    threshold: float | None = Field(None, ge=-1.0, le=1.0)
    where: str | None = Field(None, max_length=2000)
    save: bool = False
    index: Literal["auto", "exact", "ivf", "ivfpq", "hnsw"] | None = None


class SearchRequest(SearchOptions):
    """``POST /search`` with JSON: a stored image or a vector as the query."""

    image_id: str | None = Field(None, max_length=1024)
    listing_id: str | None = Field(None, max_length=1024)
    vector: list[float] | None = Field(None, max_length=65_536)


class ImageInfo(BaseModel):
    """A stored image's metadata."""

    listing_id: str
    image_id: str
    model: str
    source: str | None
    sha256: str
    width: int | None
    height: int | None
    ingested_at: float
    labels: dict[str, Any] | None
    thumbnail_url: str


class AddImageResponse(BaseModel):
    """Result of ``POST /images``."""

    listing_id: str
    image_id: str
    status: Literal["added", "updated", "unchanged"]


class Listing(BaseModel):
    """A listing and its live attributes."""

    listing_id: str
    attrs: dict[str, Any]


class MapPoint(BaseModel):
    """One image on the 2-D map of the collection."""

    listing_id: str
    image_id: str
    x: float
    y: float
    cluster: int | None = None
    outlier: float | None = None
    thumbnail_url: str


class MapResponse(BaseModel):
    """2-D map of the collection (``method``: ``pca``, or ``analyze`` for the coordinates
    stored by ``lookalike analyze map``)."""

    method: str
    total: int
    points: list[MapPoint]


class ErrorBody(BaseModel):
    """Error details."""

    status: int
    message: str


class ErrorResponse(BaseModel):
    """Every error answer."""

    error: ErrorBody


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 415, 422)
}


# ------------------------------------------------------------------------------------ app


def thumbnail_url(image_id: str, listing_id: str) -> str:
    """URL of a hit's thumbnail (ids are URL-quoted)."""
    from urllib.parse import quote

    return f"/images/{quote(image_id, safe='/')}/thumbnail?listing_id={quote(listing_id, safe='')}"


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
    metrics = Metrics(cat)
    app = FastAPI(
        title="lookalike",
        version=_version(),
        description="Semantic image search: find the images and listings that look like a "
        "query image, a stored image or a vector.",
    )
    app.state.catalog = cat
    map_cache: dict[str, Any] = {}
    map_lock = threading.Lock()

    # -------------------------------------------------------------- errors & metrics

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": {"status": status, "message": message}}, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error(422, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(LookalikeError)
    async def lookalike_error(request: Request, exc: LookalikeError) -> JSONResponse:
        status = 400
        if isinstance(exc, NotFoundError):
            status = 404
        elif isinstance(exc, ImageError):
            status = 415
        elif isinstance(exc, ModelMismatchError):
            status = 409
        return error(status, str(exc))

    @app.middleware("http")
    async def count(request: Request, call_next: Any) -> Any:
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.observe(request.method, getattr(route, "path", "unmatched"),
                        response.status_code, time.perf_counter() - t0)
        return response

    def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
        if token is None:
            return
        expected = f"Bearer {token}"
        if not authorization or not hmac.compare_digest(authorization.encode(),
                                                        expected.encode()):
            raise HTTPException(401, "missing or wrong bearer token (Authorization: Bearer ...)")

    async def read_upload(upload: UploadFile) -> bytes:
        data = await upload.read(max_upload + 1)
        if len(data) > max_upload:
            raise HTTPException(413, f"upload is over the {max_upload}-byte limit")
        if not data:
            raise HTTPException(400, "the uploaded file is empty")
        return data

    def response(result: SearchResult) -> dict[str, Any]:
        out = result.to_dict()
        for hit in out["hits"]:
            hit["thumbnail_url"] = thumbnail_url(hit["image_id"], hit["listing_id"])
        return out

    # -------------------------------------------------------------- search

    @app.post(
        "/search",
        response_model=SearchResponse,
        response_model_exclude_none=True,
        responses=ERRORS,
        summary="Search by an uploaded image, a stored image id or a vector",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {"schema": {
                        "type": "object", "required": ["image"],
                        "properties": {
                            "image": {"type": "string", "format": "binary"},
                            **{name: {"type": "string"} for name in SearchOptions.model_fields},
                        },
                    }},
                    "application/json": {
                        "schema": {"$ref": "#/components/schemas/SearchRequest"}
                    },
                },
            }
        },
    )
    async def search(request: Request) -> dict[str, Any]:
        """Multipart: the image in field ``image``, options as form fields. JSON: a
        :class:`SearchRequest` with ``image_id`` (and ``listing_id``) or ``vector``."""
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            form = await request.form(max_files=1, max_fields=32)
            upload = form.get("image")
            if not isinstance(upload, UploadFile) and not hasattr(upload, "read"):
                raise HTTPException(422, "image: an image file is required (multipart field)")
            data = await read_upload(upload)  # type: ignore[arg-type]
            try:
                opts = SearchOptions.model_validate(
                    {k: v for k, v in form.items() if k != "image" and v != ""}
                )
            except ValidationError as exc:
                raise RequestValidationError(exc.errors()) from None
            query: Any = data
            extra: dict[str, Any] = {}
        elif ctype.startswith("application/json"):
            try:
                req = SearchRequest.model_validate_json(await request.body())
            except ValidationError as exc:
                raise RequestValidationError(exc.errors()) from None
            opts, query = req, None
            if (req.image_id is None) == (req.vector is None):
                raise HTTPException(422, "give exactly one of image_id and vector")
            extra = ({"image_id": req.image_id, "listing_id": req.listing_id}
                     if req.image_id is not None else {"vector": np.asarray(req.vector)})
        else:
            raise HTTPException(415, "send multipart/form-data (field image) or JSON")
        kwargs = dict(k=opts.k, group_by=opts.group_by, agg=opts.agg, top_n=opts.top_n,
                      threshold=opts.threshold, where=opts.where, save=opts.save,
                      index=opts.index)
        from starlette.concurrency import run_in_threadpool

        result = await run_in_threadpool(cat.search, query, **extra, **kwargs)
        if isinstance(result, list):
            raise HTTPException(422, "vector must be one (d,) vector")
        return response(result)

    # -------------------------------------------------------------- images

    @app.post("/images", response_model=AddImageResponse, responses=ERRORS,
              dependencies=[Depends(require_token)], summary="Add or replace one image")
    async def add_image(
        image: Annotated[UploadFile, File(description="The image file.")],
        listing_id: Annotated[str, Form(min_length=1, max_length=1024)],
        image_id: Annotated[str, Form(min_length=1, max_length=1024)],
    ) -> dict[str, Any]:
        data = await read_upload(image)
        for name, value in (("listing_id", listing_id), ("image_id", image_id)):
            if any(ord(c) < 32 for c in value):
                raise HTTPException(422, f"{name}: control characters are not allowed")
        from starlette.concurrency import run_in_threadpool

        (status, reason), = await run_in_threadpool(
            cat.add_many, [(data, listing_id, image_id, f"upload:{image.filename or ''}")]
        )
        if status == "failed":
            raise ImageError(reason)
        return {"listing_id": listing_id, "image_id": image_id, "status": status}

    @app.get("/images/{image_id:path}/thumbnail", responses=ERRORS,
             response_class=FileResponse, summary="JPEG thumbnail of a stored image")
    def get_thumbnail(image_id: str, listing_id: Annotated[str | None, Query()] = None) -> Any:
        path = cat.thumbnail(image_id, listing_id)
        return FileResponse(path, media_type="image/jpeg",
                            headers={"Cache-Control": "public, max-age=86400"})

    @app.get("/images/{image_id:path}", response_model=ImageInfo, responses=ERRORS,
             summary="A stored image's metadata")
    def get_image(image_id: str, listing_id: Annotated[str | None, Query()] = None) -> Any:
        rec = cat.get_image(image_id, listing_id)
        return {
            "listing_id": rec.listing_id, "image_id": rec.image_id, "model": rec.model,
            "source": rec.source, "sha256": rec.sha256, "width": rec.width,
            "height": rec.height, "ingested_at": rec.ingested_at, "labels": rec.labels,
            "thumbnail_url": thumbnail_url(rec.image_id, rec.listing_id),
        }

    @app.delete("/images/{image_id:path}", responses=ERRORS,
                dependencies=[Depends(require_token)], summary="Delete a stored image")
    def delete_image(image_id: str, listing_id: Annotated[str | None, Query()] = None) -> Any:
        if cat.delete(image_id, listing_id) == 0:
            raise NotFoundError(f"no image {image_id!r}")
        return {"deleted": image_id}

    # -------------------------------------------------------------- listings

    @app.get("/listings/{listing_id:path}", response_model=Listing, responses=ERRORS,
             summary="A listing's live attributes")
    def get_listing(listing_id: str) -> Any:
        rec = cat.get_listing(listing_id)
        return {"listing_id": rec.listing_id, "attrs": rec.attrs}

    @app.put("/listings/{listing_id:path}", response_model=Listing, responses=ERRORS,
             dependencies=[Depends(require_token)],
             summary="Set live attributes (stock_level, ...); null removes one")
    def put_listing(
        listing_id: str, attrs: dict[str, str | int | float | bool | None]
    ) -> Any:
        if not listing_id or len(listing_id) > 1024:
            raise HTTPException(422, "listing_id must be 1-1024 characters")
        cat.update_listing(listing_id, **attrs)
        rec = cat.get_listing(listing_id)
        return {"listing_id": rec.listing_id, "attrs": rec.attrs}

    # -------------------------------------------------------------- facts

    @app.get("/stats", summary="Catalog facts")
    def stats() -> dict[str, Any]:
        return cat.stats()

    @app.get("/healthz", summary="Liveness")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse,
             summary="Prometheus metrics: requests, latencies, catalog size")
    def get_metrics() -> PlainTextResponse:
        body, ctype = metrics.render()
        return PlainTextResponse(body, media_type=ctype)

    @app.get("/map", response_model=MapResponse, summary="2-D map of the collection")
    def get_map(limit: Annotated[int, Query(ge=1, le=MAP_MAX_POINTS)] = MAP_MAX_POINTS) -> Any:
        with map_lock:
            cache = cat.vector_cache() if cat.model is not None else None
            analysis = cat.analysis()
            stamp = (cache.version if cache else -1, limit, len(analysis), hash(frozenset(
                (k, v.get("cluster"), v.get("x")) for k, v in list(analysis.items())[:64])))
            if map_cache.get("version") != stamp:
                body = map_points(cat, limit)
                for p in body["points"]:
                    p["thumbnail_url"] = thumbnail_url(p["image_id"], p["listing_id"])
                map_cache["version"] = stamp
                map_cache["body"] = body
        return map_cache["body"]

    # -------------------------------------------------------------- page

    @app.get("/", include_in_schema=False)
    def index() -> RedirectResponse:
        return RedirectResponse("/static/index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _version() -> str:
    from .. import __version__

    return __version__

