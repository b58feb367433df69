"""``POST /search``: one path, two declared operations chosen by the request's media type.

* multipart/form-data (:class:`~lookalike.server.schemas.SearchUpload`): the image in field
  ``image``, the options as form fields;
* application/json (:class:`~lookalike.server.schemas.SearchRequest`): a stored image id or
  a vector, and the options;
* anything else: 415.

Both answer :class:`~lookalike.server.schemas.SearchResponse`; the OpenAPI document shows
one operation with both request bodies (:func:`lookalike.server.openapi.document`).
``save=true`` writes rows, so it needs the write token when the server has one; what was
saved is read back with ``GET /results/{query_id}`` and deleted with ``DELETE`` (write
token) or when it expires (:mod:`lookalike.server.expiry`); the document links them. A search
the catalog cannot answer in its present state (it is empty; the ANN index asked for was not
built) is a 409, checked before an upload is decoded. Uploads are decoded and embedded under
the server's decode slots (at most ``max_decodes`` at once).
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Form, HTTPException, Path
from starlette.concurrency import run_in_threadpool

from ...catalog import Catalog
from ...types import IndexKind
from ..deps import READ, WRITE, AccessDep, CatalogDep, StateDep, read_upload
from ..routing import MediaTypeRoute
from ..schemas import (
    ERRORS,
    LOOKUP_PATTERN,
    Deleted,
    SearchOptions,
    SearchRequest,
    SearchResponse,
    SearchUpload,
    search_response,
)
from ..state import Settings

router = APIRouter(route_class=MediaTypeRoute, tags=["search"], dependencies=READ)
#: The saved results a search answer names, and where its query_id leads.
RESULT_LINKS = {
    "GetResults": {
        "operationId": "get_results",
        "parameters": {"path.query_id": "$response.body#/query_id"},
        "description": "The hits a search with save=true saved (404 for any other search).",
    },
    "DeleteResults": {
        "operationId": "delete_results",
        "parameters": {"path.query_id": "$response.body#/query_id"},
        "description": "Delete the hits a search with save=true saved.",
    },
}
ROUTE: dict[str, Any] = dict(
    response_model=SearchResponse,
    response_model_exclude_none=True,
    responses={**ERRORS, 200: {"links": RESULT_LINKS}},
    summary="Search by an uploaded image, a stored image id or a vector",
)


def _check_save(save: bool, settings: Settings, access: Any) -> None:
    """``save=true`` writes rows: 401 without the write token when the server has one."""
    if save and settings.token is not None and access != "write":
        raise HTTPException(401, "save=true writes rows: it needs the write token")


def _check_ready(cat: Catalog, options: SearchOptions) -> None:
    """409 when the catalog cannot answer in its present state: it has no model yet (empty),
    or ``index`` names an ANN kind that was not built."""
    if cat.model is None:
        raise HTTPException(409, "the catalog is empty; index some images first")
    kind = options.index
    if kind in IndexKind.ann() and cat.ann_engine(kind) is None:
        raise HTTPException(
            409, f"no {kind} index is built; build one with `lookalike ann build --kind {kind}`"
        )


@router.post("/search", operation_id="search", **ROUTE)
async def search_upload(
    form: Annotated[SearchUpload, Form(media_type="multipart/form-data")],
    state: StateDep,
    access: AccessDep,
) -> dict[str, Any]:
    """Multipart: the image in field ``image``, options as form fields. JSON: a
    :class:`SearchRequest` with ``image_id`` (and ``listing_id``) or ``vector``.
    ``save=true`` needs the write token when the server has one.

    (This docstring describes the merged operation of the OpenAPI document.)"""
    _check_save(form.save, state.settings, access)
    await run_in_threadpool(_check_ready, state.catalog, form)
    data = await read_upload(form.image, state.settings)
    async with state.decodes.hold():
        result = await run_in_threadpool(state.catalog.search, data, **form.search_kwargs())
    band = await run_in_threadpool(state.bands.get, state.catalog)
    return search_response(result, band.band)


@router.post("/search", operation_id="search_json", **ROUTE)
def search_json(
    req: SearchRequest, cat: CatalogDep, state: StateDep, access: AccessDep
) -> dict[str, Any]:
    """JSON: a stored image (``image_id``, ``listing_id``) or a ``vector`` as the query."""
    _check_save(req.save, state.settings, access)
    _check_ready(cat, req)
    if req.image_id is not None:
        query: dict[str, Any] = {"image_id": req.image_id, "listing_id": req.listing_id}
    else:
        query = {"vector": np.asarray(req.vector)}
    result = cat.search(**query, **req.search_kwargs())
    return search_response(result, state.bands.get(cat).band)


@router.post("/search", include_in_schema=False)
def search_other_media() -> None:
    """Neither multipart nor JSON: 415."""
    raise HTTPException(415, "send multipart/form-data (field image) or JSON")


QueryId = Annotated[str, Path(min_length=1, max_length=128, pattern=LOOKUP_PATTERN)]


@router.get(
    "/results/{query_id}",
    operation_id="get_results",
    response_model=SearchResponse,
    response_model_exclude_none=True,
    responses=ERRORS,
    summary="The hits a search saved (save=true) under its query_id",
)
def get_results(query_id: QueryId, cat: CatalogDep) -> dict[str, Any]:
    return search_response(cat.saved_results(query_id))


@router.delete(
    "/results/{query_id}",
    operation_id="delete_results",
    response_model=Deleted,
    responses=ERRORS,
    dependencies=WRITE,
    summary="Delete the hits a search saved (they also expire: serve --results-ttl)",
)
def delete_results(query_id: QueryId, cat: CatalogDep) -> dict[str, str]:
    cat.delete_results(query_id)
    return {"deleted": query_id}
