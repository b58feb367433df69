"""Images: ``POST /images`` (add or replace one, token), ``GET /images/{id}`` (metadata),
``GET /images/{id}/thumbnail`` (a JPEG <= 192 px), ``DELETE /images/{id}`` (token).

Image ids may contain ``/`` (``{image_id:path}``); ``?listing_id=`` disambiguates an id
stored under several listings. Thumbnails come from the catalog's content-addressed cache;
no request names a file path.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Query
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from ...errors import ImageError, NotFoundError
from ...types import WriteStatus
from ..deps import WRITE, CatalogDep, SettingsDep, read_upload
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
    cat: CatalogDep,
    settings: SettingsDep,
) -> dict[str, Any]:
    data = await read_upload(form.image, settings)
    item = (data, form.listing_id, form.image_id, f"upload:{form.image.filename or ''}")
    ((status, reason),) = await run_in_threadpool(cat.add_many, [item])
    if status == WriteStatus.FAILED:
        raise ImageError(reason)
    return {"listing_id": form.listing_id, "image_id": form.image_id, "status": status}


@router.get(
    "/images/{image_id:path}/thumbnail",
    response_class=FileResponse,
    summary="JPEG thumbnail of a stored image",
)
def get_thumbnail(image_id: str, cat: CatalogDep, listing_id: ListingQuery = None) -> Any:
    path = cat.thumbnail(image_id, listing_id)
    return FileResponse(
        path, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=86400"}
    )


@router.get(
    "/images/{image_id:path}", response_model=ImageInfo, summary="A stored image's metadata"
)
def get_image(image_id: str, cat: CatalogDep, listing_id: ListingQuery = None) -> Any:
    rec = cat.get_image(image_id, listing_id)
    return {
        "listing_id": rec.listing_id,
        "image_id": rec.image_id,
        "model": rec.model,
        "source": rec.source,
        "sha256": rec.sha256,
        "width": rec.width,
        "height": rec.height,
        "ingested_at": rec.ingested_at,
        "labels": rec.labels,
        "thumbnail_url": thumbnail_url(rec.image_id, rec.listing_id),
    }


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
