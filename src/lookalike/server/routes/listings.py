"""Listings: ``GET /listings/{id}`` and ``PUT /listings/{id}`` (token): a listing's live
attributes (``stock_level``, ...), the ones ``where`` filters join on; ``null`` removes one."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from ...types import ListingRecord
from ..deps import WRITE, CatalogDep
from ..routing import ServerRoute
from ..schemas import ERRORS

router = APIRouter(route_class=ServerRoute, tags=["listings"], responses=ERRORS)
#: A JSON attribute value; null removes the attribute.
AttrValue = str | int | float | bool | None


@router.get(
    "/listings/{listing_id:path}",
    response_model=ListingRecord,
    summary="A listing's live attributes",
)
def get_listing(listing_id: str, cat: CatalogDep) -> ListingRecord:
    return cat.get_listing(listing_id)


@router.put(
    "/listings/{listing_id:path}",
    response_model=ListingRecord,
    dependencies=WRITE,
    summary="Set live attributes (stock_level, ...); null removes one",
)
def put_listing(
    listing_id: Annotated[str, Path(min_length=1, max_length=1024)],
    attrs: dict[str, AttrValue],
    cat: CatalogDep,
) -> ListingRecord:
    cat.update_listing(listing_id, **attrs)
    return cat.get_listing(listing_id)
