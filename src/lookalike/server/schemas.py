"""Request and response schemas of the HTTP API, all in one place.

Hits are :class:`lookalike.types.Hit` itself (a dataclass subclass adds only what HTTP adds,
``thumbnail_url``), listings are :class:`lookalike.types.ListingRecord`, and every closed
choice (aggregation, group_by, index kind, write status, ...) is a vocabulary of
:mod:`lookalike.types`, so the OpenAPI document, the web page (``GET /options``) and the
Python API cannot drift apart. The JSON of a search is ``SearchResult.to_dict()`` plus the
thumbnail URLs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import File, UploadFile
from pydantic import BaseModel, Field

from ..types import (
    Aggregation,
    CodeKind,
    EngineKind,
    GroupBy,
    Hit,
    IndexKind,
    SearchResult,
    WriteStatus,
)
from .errors import STATUS

#: A listing or image id: 1-1024 characters, no control characters.
ID_PATTERN = r"^[^\x00-\x1f]+$"
Id = Annotated[str, Field(min_length=1, max_length=1024, pattern=ID_PATTERN)]


def thumbnail_url(image_id: str, listing_id: str) -> str:
    """URL of an image's thumbnail (ids are URL-quoted): ``/thumbnails/{image_id}``, which no
    image id can shadow."""
    return f"/thumbnails/{quote(image_id, safe='/')}?listing_id={quote(listing_id, safe='')}"


# ------------------------------------------------------------------------------------ search


class SearchOptions(BaseModel):
    """Search options (JSON body of ``POST /search``; form fields with an upload). They mean
    what the arguments of ``Catalog.search`` mean."""

    k: int | None = Field(None, ge=1, le=10_000, description="Hits (default 10).")
    group_by: GroupBy | None = Field(None, description="One hit per listing.")
    agg: Aggregation = Field(Aggregation.MAX, description="Per-listing score when grouped.")
    top_n: int = Field(3, ge=1, le=64, description="n of sum-top-n.")
    threshold: float | None = Field(None, ge=-1.0, le=1.0, description="Only score > this.")
    where: str | None = Field(None, max_length=2000, description='e.g. "stock_level > 0".')
    save: bool = Field(False, description="Write the hits to query_results.")
    index: IndexKind | None = Field(None, description="Where candidates come from.")

    def search_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``Catalog.search``."""
        return self.model_dump()


class SearchUpload(SearchOptions):
    """``POST /search`` with multipart/form-data: the query image and the options."""

    image: UploadFile = File(description="The query image.")

    def search_kwargs(self) -> dict[str, Any]:
        return self.model_dump(exclude={"image"})


class SearchRequest(SearchOptions):
    """``POST /search`` with JSON: a stored image (``image_id``, ``listing_id`` when ids
    repeat) or a ``vector`` as the query; exactly one of them."""

    image_id: str | None = Field(None, max_length=1024)
    listing_id: str | None = Field(None, max_length=1024)
    vector: list[float] | None = Field(None, max_length=65_536)

    def search_kwargs(self) -> dict[str, Any]:
        return self.model_dump(exclude={"image_id", "listing_id", "vector"})


@dataclass
class HitOut(Hit):
    """A :class:`lookalike.types.Hit` as HTTP answers it: with its thumbnail's URL."""

    thumbnail_url: str = field(kw_only=True)


class SearchResponse(BaseModel):
    """The same JSON as ``lookalike search --format json`` (``SearchResult.to_dict()``), with
    a thumbnail URL per hit."""

    query_id: str
    hits: list[HitOut]


def search_response(result: SearchResult) -> dict[str, Any]:
    """``result.to_dict()`` with ``thumbnail_url`` added to every hit."""
    out = result.to_dict()
    for hit in out["hits"]:
        hit["thumbnail_url"] = thumbnail_url(hit["image_id"], hit["listing_id"])
    return out


# ------------------------------------------------------------------------------------ images


class ImageUpload(BaseModel):
    """``POST /images``: one image and its key."""

    image: UploadFile = File(description="The image file.")
    listing_id: Id
    image_id: Id


class ImageInfo(BaseModel):
    """A stored image's metadata (``ImageRecord`` without its vector) and thumbnail URL.
    ``source`` is the file's last part unless the request bears a token."""

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
    """Result of ``POST /images`` (``failed`` is never answered: that is a 415)."""

    listing_id: str
    image_id: str
    status: WriteStatus


class Deleted(BaseModel):
    """Result of ``DELETE /images/{image_id}``."""

    deleted: str


# ------------------------------------------------------------------------------------ facts


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


class Options(BaseModel):
    """The vocabularies a client may offer (from :mod:`lookalike.types`), in declaration
    order, and the server's upload limit."""

    aggregations: list[Aggregation]
    group_by: list[GroupBy]
    index_kinds: list[IndexKind]
    code_kinds: list[CodeKind]
    engine_kinds: list[EngineKind]
    max_upload: int = Field(description="Largest accepted upload, bytes.")


# ------------------------------------------------------------------------------------ errors


class ErrorBody(BaseModel):
    """Error details."""

    status: int
    message: str


class ErrorResponse(BaseModel):
    """Every error answer."""

    error: ErrorBody


#: Documented error answers of the operations: the statuses of the error table, plus the
#: ones the HTTP layer adds (401 token, 413 too large, 415 wrong media type, 422 schema).
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in sorted({*STATUS.values(), 401, 413, 415, 422})
}
