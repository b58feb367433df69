"""Images: ``POST /images`` (add or replace one, token), ``GET /images/{id}`` (metadata),
``GET /thumbnails/{id}`` (a JPEG <= 192 px), ``DELETE /images/{id}`` (token).

Image ids may contain ``/`` (``{image_id:path}``); ``?listing_id=`` disambiguates an id
stored under several listings. Thumbnails come from the catalog's content-addressed cache;
no request names a file path. ``GET /images/{id}/thumbnail`` is the older thumbnail route,
kept: it answers the thumbnail of ``{id}`` when that image is stored, else the metadata of an
image whose id itself ends in ``/thumbnail`` (so such an id is never shadowed);
``/thumbnails/{id}`` is unambiguous and what ``thumbnail_url`` gives.

An image's ``source`` (where its file was read from on the server) is answered whole only to
a request that bears a token; others get its last part.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Path, Query
from fastapi.encoders import jsonable_encoder
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from ...catalog import Catalog
from ...catalog.validate import check_id
from ...errors import ImageError, NotFoundError
from ...types import MAX_ID_LENGTH, WriteStatus
from ..deps import READ, WRITE, Access, AccessDep, CatalogDep, StateDep, read_upload
from ..routing import ServerRoute
from ..schemas import (
    ERRORS,
    LOOKUP_PATTERN,
    AddImageResponse,
    Deleted,
    ImageInfo,
    ImageUpload,
    thumbnail_url,
)

router = APIRouter(route_class=ServerRoute, tags=["images"], responses=ERRORS)
#: A stored image's id in a path (it may contain ``/``); looked up as it is.
ImageId = Annotated[str, Path(min_length=1, max_length=MAX_ID_LENGTH, pattern=LOOKUP_PATTERN)]
ListingQuery = Annotated[
    str | None,
    Query(
        min_length=1,
        max_length=MAX_ID_LENGTH,
        pattern=LOOKUP_PATTERN,
        description="The listing, when ids repeat.",
    ),
]


def _link(operation: str, description: str) -> dict[str, Any]:
    return {
        "operationId": operation,
        "parameters": {
            "path.image_id": "$response.body#/image_id",
            "query.listing_id": "$response.body#/listing_id",
        },
        "description": description,
    }


#: Where an added image's key leads (OpenAPI links of ``POST /images``).
IMAGE_LINKS = {
    "GetImage": _link("get_image", "The added image's metadata."),
    "GetThumbnail": _link("get_thumbnail", "The added image's thumbnail."),
    "DeleteImage": _link("delete_image", "Delete the added image."),
    "GetListing": {
        "operationId": "get_listing",
        "parameters": {"path.listing_id": "$response.body#/listing_id"},
        "description": "The added image's listing.",
    },
}


@router.post(
    "/images",
    operation_id="add_image",
    response_model=AddImageResponse,
    responses={200: {"links": IMAGE_LINKS}},
    dependencies=WRITE,
    summary="Add or replace one image",
)
async def add_image(
    form: Annotated[ImageUpload, Form(media_type="multipart/form-data")],
    state: StateDep,
) -> dict[str, Any]:
    # the catalog's id rule, before the upload is read or decoded: a 400, not a 415
    check_id(form.listing_id, "listing_id")
    check_id(form.image_id, "image_id")
    data = await read_upload(form.image, state.settings)
    item = (data, form.listing_id, form.image_id, f"upload:{form.image.filename or ''}")
    async with state.decodes.hold():
        ((status, reason),) = await run_in_threadpool(state.catalog.add_many, [item])
    if status == WriteStatus.FAILED:
        raise ImageError(reason)
    return {"listing_id": form.listing_id, "image_id": form.image_id, "status": status}


#: The answer of a thumbnail route: a JPEG.
JPEG: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A JPEG thumbnail.",
        "content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def _thumbnail(cat: Catalog, image_id: str, listing_id: str | None) -> FileResponse:
    path = cat.thumbnail(image_id, listing_id)
    return FileResponse(
        path, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=86400"}
    )


def _info(cat: Catalog, image_id: str, listing_id: str | None, access: Access) -> dict[str, Any]:
    rec = cat.get_image(image_id, listing_id)
    source = rec.source
    if source is not None and access is None:  # no server paths to strangers
        source = source.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return {
        "listing_id": rec.listing_id,
        "image_id": rec.image_id,
        "model": rec.model,
        "source": source,
        "sha256": rec.sha256,
        "width": rec.width,
        "height": rec.height,
        "ingested_at": rec.ingested_at,
        "labels": rec.labels,
        "thumbnail_url": thumbnail_url(rec.image_id, rec.listing_id),
    }


@router.get(
    "/thumbnails/{image_id:path}",
    operation_id="get_thumbnail",
    response_class=FileResponse,
    responses=JPEG,
    dependencies=READ,
    summary="JPEG thumbnail of a stored image",
)
def get_thumbnail(image_id: ImageId, cat: CatalogDep, listing_id: ListingQuery = None) -> Any:
    return _thumbnail(cat, image_id, listing_id)


@router.get(
    "/images/{image_id:path}/thumbnail",
    operation_id="get_thumbnail_old",
    response_class=FileResponse,
    include_in_schema=False,
    summary="JPEG thumbnail of a stored image (older route; see /thumbnails/{image_id})",
    description="The thumbnail of `image_id` when it is stored; otherwise the metadata of an "
    "image whose id is `{image_id}/thumbnail`, so such ids are not shadowed.",
)
def get_thumbnail_old(
    image_id: ImageId, cat: CatalogDep, access: AccessDep, listing_id: ListingQuery = None
) -> Any:
    try:
        return _thumbnail(cat, image_id, listing_id)
    except NotFoundError:
        try:
            info = _info(cat, f"{image_id}/thumbnail", listing_id, access)
            return JSONResponse(jsonable_encoder(info))
        except NotFoundError:
            pass
        raise


@router.get(
    "/images/{image_id:path}",
    operation_id="get_image",
    response_model=ImageInfo,
    responses={200: {"content": {"image/jpeg": {"schema": {"type": "string"}}}}},
    summary="A stored image's metadata",
    description="The metadata of a stored image. `GET /images/{id}/thumbnail` is also the "
    "older thumbnail route (not listed): it answers the JPEG thumbnail of `{id}` when that "
    "image is stored, else the metadata of the image whose id ends in `/thumbnail`.",
)
def get_image(
    image_id: ImageId, cat: CatalogDep, access: AccessDep, listing_id: ListingQuery = None
) -> Any:
    return _info(cat, image_id, listing_id, access)


@router.delete(
    "/images/{image_id:path}",
    operation_id="delete_image",
    response_model=Deleted,
    dependencies=WRITE,
    summary="Delete a stored image",
)
def delete_image(image_id: ImageId, cat: CatalogDep, listing_id: ListingQuery = None) -> Any:
    if cat.delete(image_id, listing_id) == 0:
        raise NotFoundError(f"no image {image_id!r}")
    return {"deleted": image_id}
