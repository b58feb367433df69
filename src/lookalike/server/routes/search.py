"""``POST /search``: one path, two declared operations chosen by the request's media type.

* multipart/form-data (:class:`~lookalike.server.schemas.SearchUpload`): the image in field
  ``image``, the options as form fields;
* application/json (:class:`~lookalike.server.schemas.SearchRequest`): a stored image id or
  a vector, and the options;
* anything else: 415.

Both answer :class:`~lookalike.server.schemas.SearchResponse`; the OpenAPI document shows
one operation with both request bodies (:func:`lookalike.server.routing.openapi`).
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Form, HTTPException
from starlette.concurrency import run_in_threadpool

from ..deps import CatalogDep, SettingsDep, read_upload
from ..routing import MediaTypeRoute
from ..schemas import ERRORS, SearchRequest, SearchResponse, SearchUpload, search_response

router = APIRouter(route_class=MediaTypeRoute, tags=["search"])
ROUTE: dict[str, Any] = dict(
    response_model=SearchResponse,
    response_model_exclude_none=True,
    responses=ERRORS,
    summary="Search by an uploaded image, a stored image id or a vector",
)


@router.post("/search", operation_id="search", **ROUTE)
async def search_upload(
    form: Annotated[SearchUpload, Form(media_type="multipart/form-data")],
    cat: CatalogDep,
    settings: SettingsDep,
) -> dict[str, Any]:
    """Multipart: the image in field ``image``, options as form fields. JSON: a
    :class:`SearchRequest` with ``image_id`` (and ``listing_id``) or ``vector``.

    (This docstring describes the merged operation of the OpenAPI document.)"""
    data = await read_upload(form.image, settings)
    result = await run_in_threadpool(cat.search, data, **form.search_kwargs())
    return search_response(result)


@router.post("/search", operation_id="search_json", **ROUTE)
def search_json(req: SearchRequest, cat: CatalogDep) -> dict[str, Any]:
    """JSON: a stored image (``image_id``, ``listing_id``) or a ``vector`` as the query."""
    if (req.image_id is None) == (req.vector is None):
        raise HTTPException(422, "give exactly one of image_id and vector")
    if req.image_id is not None:
        query: dict[str, Any] = {"image_id": req.image_id, "listing_id": req.listing_id}
    else:
        query = {"vector": np.asarray(req.vector)}
    return search_response(cat.search(**query, **req.search_kwargs()))


@router.post("/search", include_in_schema=False)
def search_other_media() -> None:
    """Neither multipart nor JSON: 415."""
    raise HTTPException(415, "send multipart/form-data (field image) or JSON")
