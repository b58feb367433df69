"""Listings: ``GET /listings/{id}`` and ``PUT /listings/{id}`` (token): a listing's live
attributes (``stock_level``, ...), the ones ``where`` filters join on; ``null`` removes one.

``PUT`` takes a :class:`~lookalike.server.schemas.ListingAttrs` body, whose schema declares
what is refused: NaN or an infinite number, a number outside int64, an empty attribute name,
a non-whole ``stock_level``, a non-string ``etag`` (stored as text, so ``{"etag": 5}`` would
come back as ``"5"``). The catalog checks the rest (:mod:`lookalike.catalog.validate`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from ...types import MAX_ID_LENGTH, ListingRecord
from ..deps import READ, WRITE, CatalogDep
from ..routing import ServerRoute
from ..schemas import ERRORS, ID_PATTERN, LOOKUP_PATTERN, ListingAttrs

router = APIRouter(route_class=ServerRoute, tags=["listings"], responses=ERRORS)
#: A listing's id to look up (``GET``), and one to write (``PUT``: the id rule).
LookupListing = Annotated[str, Path(min_length=1, max_length=MAX_ID_LENGTH, pattern=LOOKUP_PATTERN)]
WriteListing = Annotated[str, Path(min_length=1, max_length=MAX_ID_LENGTH, pattern=ID_PATTERN)]


@router.get(
    "/listings/{listing_id:path}",
    operation_id="get_listing",
    response_model=ListingRecord,
    dependencies=READ,
    summary="A listing's live attributes",
)
def get_listing(listing_id: LookupListing, cat: CatalogDep) -> ListingRecord:
    return cat.get_listing(listing_id)


@router.put(
    "/listings/{listing_id:path}",
    operation_id="put_listing",
    response_model=ListingRecord,
    dependencies=WRITE,
    summary="Set live attributes (stock_level, ...); null removes one",
)
def put_listing(listing_id: WriteListing, attrs: ListingAttrs, cat: CatalogDep) -> ListingRecord:
    cat.update_listing(listing_id, **attrs.root)
    return cat.get_listing(listing_id)
