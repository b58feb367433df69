"""Listings: ``GET /listings/{id}`` and ``PUT /listings/{id}`` (token): a listing's live
attributes (``stock_level``, ...), the ones ``where`` filters join on; ``null`` removes one.

``PUT`` refuses (400) what it could not store as sent: NaN or an infinite number, an integer
outside int64, an empty attribute name, and a non-string ``etag`` (stored as text, so
``{"etag": 5}`` would come back as ``"5"``)."""

from __future__ import annotations

import math
from typing import Annotated, Any

from fastapi import APIRouter, Path

from ...errors import QueryError
from ...types import ListingRecord
from ..deps import READ, WRITE, CatalogDep
from ..routing import ServerRoute
from ..schemas import ERRORS

router = APIRouter(route_class=ServerRoute, tags=["listings"], responses=ERRORS)
#: A JSON attribute value; null removes the attribute.
AttrValue = str | int | float | bool | None
INT64 = (-(2**63), 2**63 - 1)


def check_attrs(attrs: dict[str, Any]) -> None:
    """Raise QueryError for an attribute the store would not keep as sent."""
    for name, value in attrs.items():
        if not name.strip():
            raise QueryError("listing attribute names must not be empty")
        if isinstance(value, float) and not math.isfinite(value):
            raise QueryError(f"listing attribute {name!r}: {value} is not a finite number")
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if is_int and not INT64[0] <= value <= INT64[1]:
            raise QueryError(f"listing attribute {name!r}: {value} is outside int64")
        if name == "etag" and value is not None and not isinstance(value, str):
            raise QueryError("listing attribute 'etag' must be a string (or null)")


@router.get(
    "/listings/{listing_id:path}",
    response_model=ListingRecord,
    dependencies=READ,
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
    check_attrs(attrs)
    cat.update_listing(listing_id, **attrs)
    return cat.get_listing(listing_id)
