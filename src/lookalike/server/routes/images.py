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

from fastapi import APIRouter, Form, Query
from fastapi.encoders import jsonable_encoder
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from ...catalog import Catalog
from ...catalog.validate import check_id
from ...errors import ImageError, NotFoundError
from ...types import WriteStatus
from ..deps import READ, WRITE, Access, AccessDep, CatalogDep, StateDep, read_upload
from ..routing import ServerRoute
from ..schemas import (
    ERRORS,
    AddImageResponse,
    Deleted,
    ImageInfo,
    ImageUpload,
    thumbnail_url,
)

router = APIRouter(route_class=ServerRoute, tags=["images"], responses=ERRORS)
ListingQuery = Annotated[str | None, Query(description="The listing, when ids repeat.")]


@router.post(
    "/images",
    response_model=AddImageResponse,
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
    response_class=FileResponse,
    dependencies=READ,
    summary="JPEG thumbnail of a stored image",
)
def get_thumbnail(image_id: str, cat: CatalogDep, listing_id: ListingQuery = None) -> Any:
    return _thumbnail(cat, image_id, listing_id)


@router.get(
    "/images/{image_id:path}/thumbnail",
    response_class=FileResponse,
    summary="JPEG thumbnail of a stored image (older route; see /thumbnails/{image_id})",
    description="The thumbnail of `image_id` when it is stored; otherwise the metadata of an "
    "image whose id is `{image_id}/thumbnail`, so such ids are not shadowed.",
)
def get_thumbnail_old(
    image_id: str, cat: CatalogDep, access: AccessDep, listing_id: ListingQuery = None
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
    "/images/{image_id:path}", response_model=ImageInfo, summary="A stored image's metadata"
)
def get_image(
    image_id: str, cat: CatalogDep, access: AccessDep, listing_id: ListingQuery = None
) -> Any:
    return _info(cat, image_id, listing_id, access)


@router.delete(
    "/images/{image_id:path}",
    response_model=Deleted,
    dependencies=WRITE,
    summary="Delete a stored image",
)
def delete_image(image_id: str, cat: CatalogDep, listing_id: ListingQuery = None) -> Any:
    if cat.delete(image_id, listing_id) == 0:
        raise NotFoundError(f"no image {image_id!r}")
    return {"deleted": image_id}
