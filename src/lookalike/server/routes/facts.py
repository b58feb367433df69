"""Facts about the catalog and the server: ``GET /stats``, ``/healthz``, ``/metrics``
(Prometheus text), ``/map`` (the 2-D map of the Explore view) and ``/options`` (the
vocabularies of :mod:`lookalike.types` the web page builds its choices from).

All but ``/healthz`` are reads (the read token when the server has one). ``/stats`` names the
catalog by its last part, not its location, unless the request bears a token."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import PlainTextResponse

from ...analytics.projection import map_points
from ...catalog import Catalog
from ...types import Aggregation, CodeKind, EngineKind, GroupBy, IndexKind
from ..deps import READ, AccessDep, CatalogDep, StateDep
from ..errors import catalog_name
from ..routing import ServerRoute
from ..schemas import ERRORS, MapResponse, Options, thumbnail_url
from ..state import MAP_MAX_POINTS

router = APIRouter(route_class=ServerRoute, tags=["facts"], responses=ERRORS)


@router.get("/stats", operation_id="stats", summary="Catalog facts")
def stats(cat: CatalogDep, access: AccessDep) -> dict[str, Any]:
    out = cat.stats()
    if access is None and isinstance(out.get("catalog"), str):
        out["catalog"] = catalog_name(out["catalog"])
    return out


@router.get("/healthz", operation_id="healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/metrics",
    operation_id="metrics",
    response_class=PlainTextResponse,
    dependencies=READ,
    summary="Prometheus metrics: requests, latencies, catalog size",
)
def get_metrics(state: StateDep) -> PlainTextResponse:
    body, ctype = state.metrics.render()
    return PlainTextResponse(body, media_type=ctype)


def _map_with_thumbnails(cat: Catalog, limit: int) -> dict[str, Any]:
    body = map_points(cat, limit)
    for p in body["points"]:
        p["thumbnail_url"] = thumbnail_url(p["image_id"], p["listing_id"])
    return body


@router.get(
    "/map",
    operation_id="map",
    response_model=MapResponse,
    dependencies=READ,
    summary="2-D map of the collection (built once per change, sampled per limit)",
)
def get_map(
    state: StateDep,
    limit: Annotated[int, Query(ge=1, le=MAP_MAX_POINTS)] = MAP_MAX_POINTS,
) -> Any:
    return state.map_cache.get(state.catalog, limit, _map_with_thumbnails)


@router.get(
    "/options",
    operation_id="options",
    response_model=Options,
    dependencies=READ,
    summary="Choices a client may offer",
)
async def options(state: StateDep) -> Options:
    return Options(
        aggregations=list(Aggregation),
        group_by=list(GroupBy),
        index_kinds=list(IndexKind),
        code_kinds=list(CodeKind),
        engine_kinds=list(EngineKind),
        max_upload=state.settings.max_upload,
    )
