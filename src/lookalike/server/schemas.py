"""Request and response schemas of the HTTP API, all in one place.

Hits are :class:`lookalike.types.Hit` itself (a dataclass subclass adds only what HTTP adds,
``thumbnail_url``), listings are :class:`lookalike.types.ListingRecord`, and every closed
choice (aggregation, group_by, index kind, write status, ...) is a vocabulary of
:mod:`lookalike.types`, so the OpenAPI document, the web page (``GET /options``) and the
Python API cannot drift apart. The JSON of a search is ``SearchResult.to_dict()`` plus the
thumbnail URLs.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import File, UploadFile
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    RootModel,
    model_validator,
)

from ..catalog.validate import (
    INT64_MAX,
    INT64_MIN,
    MAX_ATTR_NAME_LENGTH,
    MAX_ATTR_TEXT_LENGTH,
    check_listing_attrs,
)
from ..errors import QueryError
from ..types import (
    MAX_ID_LENGTH,
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

# ------------------------------------------------------------------------------------ text
# The patterns spell every character out (no ``\s``, no look-around): the document's readers
# (ECMA-262 regexes), the fuzzers (Python ``re``) and pydantic (Rust ``regex``) read them alike.

#: Control characters (Unicode category ``Cc``), a regex class body.
_CONTROL = r"\x00-\x1f\x7f-\x9f"
#: Characters no id may contain: ``Cc`` and the bidi override/isolate characters
#: (:data:`lookalike.types.BIDI_CONTROLS`).
_NOT_IN_ID = _CONTROL + r"\u202a-\u202e\u2066-\u2069"
#: The white space ``str.strip`` removes, less the control characters (``str.isspace``).
_SPACE = r"\x20\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
#: A listing or image id as every write takes it (:func:`lookalike.types.id_problem`): not only
#: white space, no control or bidi override/isolate character; 1-1024 characters.
ID_PATTERN = rf"^[^{_NOT_IN_ID}]*[^{_SPACE}{_NOT_IN_ID}][^{_NOT_IN_ID}]*$"
#: An id to look up: anything a store can be asked about (no NUL), so rows stored before the
#: id rule stay reachable (:func:`lookalike.catalog.validate.check_lookup_id`).
LOOKUP_PATTERN = r"^[^\x00]+$"
#: A listing attribute name (:func:`lookalike.catalog.validate.check_attr_name`).
NAME_PATTERN = rf"^[^{_CONTROL}]*[^{_SPACE}{_CONTROL}][^{_CONTROL}]*$"
#: A text attribute value: no control characters.
TEXT_PATTERN = rf"^[^{_CONTROL}]*$"
Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH, pattern=ID_PATTERN)]
LookupId = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH, pattern=LOOKUP_PATTERN)]
#: ``format`` of a ``where`` string: the grammar of :mod:`lookalike.engine.filters`.
WHERE_FORMAT = "lookalike-where"
#: Media types an uploaded image part may declare (anything Pillow decodes is read).
IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp")


def thumbnail_url(image_id: str, listing_id: str) -> str:
    """URL of an image's thumbnail (ids are URL-quoted): ``/thumbnails/{image_id}``, which no
    image id can shadow."""
    return f"/thumbnails/{quote(image_id, safe='/')}?listing_id={quote(listing_id, safe='')}"


# ------------------------------------------------------------------------------------ search


#: Largest magnitude of a query vector's component: float32's range (3.4028e38), rounded down.
VECTOR_MAX = 3.4e38
#: A query vector needs one component at least this large in magnitude: its norm is then above
#: the catalog's ``MIN_QUERY_NORM`` (1e-6) after float32 rounding, so it has a direction.
VECTOR_MIN_PEAK = 1e-5


def _blank_is_none(where: str | None) -> str | None:
    return where if where is None or where.strip() else None


def _has_peak(vector: list[float] | None) -> list[float] | None:
    if vector is not None and not any(abs(x) >= VECTOR_MIN_PEAK for x in vector):
        raise ValueError(
            f"a vector needs a component of magnitude >= {VECTOR_MIN_PEAK:g} "
            "(an all-zero vector has no direction)"
        )
    return vector


#: A vector as JSON (a query, a watchlist entry): at most 65,536 numbers within float32's
#: range, one at least :data:`VECTOR_MIN_PEAK` in magnitude (JSON Schema ``contains``). The
#: OpenAPI document gives it the catalog's dimension (``minItems`` = ``maxItems`` = d,
#: :func:`lookalike.server.openapi.document`).
Vector = Annotated[
    list[Annotated[float, Field(ge=-VECTOR_MAX, le=VECTOR_MAX)]],
    Field(
        max_length=65_536,
        json_schema_extra={
            "contains": {"anyOf": [{"minimum": VECTOR_MIN_PEAK}, {"maximum": -VECTOR_MIN_PEAK}]}
        },
    ),
    AfterValidator(_has_peak),
]


class SearchOptions(BaseModel):
    """Search options (JSON body of ``POST /search``; form fields with an upload). They mean
    what the arguments of ``Catalog.search`` mean; a blank ``where`` is no filter. An unknown
    field is a 422 (a misspelt option is not silently ignored)."""

    model_config = ConfigDict(extra="forbid")

    k: int | None = Field(None, ge=1, le=10_000, description="Hits (default 10).", examples=[10])
    group_by: GroupBy | None = Field(None, description="One hit per listing.")
    agg: Aggregation = Field(Aggregation.MAX, description="Per-listing score when grouped.")
    top_n: int = Field(3, ge=1, le=64, description="n of sum-top-n.")
    threshold: float | None = Field(None, ge=-1.0, le=1.0, description="Only score > this.")
    where: Annotated[str | None, AfterValidator(_blank_is_none)] = Field(
        None,
        examples=["stock_level > 0"],
        max_length=2000,
        description='Filter on listing attributes, e.g. "stock_level > 0" (the grammar of '
        "lookalike.engine.filters; format lookalike-where). An unknown attribute or a syntax "
        "error is a 400.",
    )
    save: bool = Field(
        False,
        description="Write the hits to query_results (needs the write token when the server "
        "has one); read them back with GET /results/{query_id}.",
    )
    index: IndexKind | None = Field(
        None,
        description="Where candidates come from; an ANN kind (ivf, ivfpq, hnsw) that was not "
        "built is a 409.",
    )

    def search_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``Catalog.search``."""
        return self.model_dump()


def _options_schema(schema: dict[str, Any]) -> None:
    """``where`` strings have the :data:`WHERE_FORMAT` format."""
    for option in schema["properties"]["where"].get("anyOf", []):
        if option.get("type") == "string":
            option["format"] = WHERE_FORMAT


def _form_schema(schema: dict[str, Any]) -> None:
    _options_schema(schema)
    form_schema(schema)


def form_schema(schema: dict[str, Any]) -> None:
    """A form field cannot carry null: an optional field is left out instead, so the
    multipart schema of a form model declares no ``null`` alternatives (nor null defaults).
    Use as the model's ``json_schema_extra``."""
    for prop in schema.get("properties", {}).values():
        options = [o for o in prop.pop("anyOf", []) if o != {"type": "null"}]
        if len(options) == 1:
            prop.update(options[0])
        elif options:
            prop["anyOf"] = options
        if prop.get("default", 0) is None:
            del prop["default"]


class SearchUpload(SearchOptions):
    """``POST /search`` with multipart/form-data: the query image and the options."""

    model_config = ConfigDict(json_schema_extra=_form_schema)

    image: UploadFile = File(
        description="The query image (JPEG, PNG, WebP, GIF, BMP, ...: what Pillow decodes); "
        "an empty file is a 400, one that is no image a 415.",
        json_schema_extra={"format": "binary", "minLength": 1},
    )

    def search_kwargs(self) -> dict[str, Any]:
        return self.model_dump(exclude={"image"})


def _one_query(schema: dict[str, Any]) -> None:
    """Exactly one of ``image_id`` and ``vector``; neither may be null."""
    _options_schema(schema)
    props = schema["properties"]
    for name in ("image_id", "vector"):
        props[name].pop("default", None)
    schema["oneOf"] = [{"required": ["image_id"]}, {"required": ["vector"]}]


class SearchRequest(SearchOptions):
    """``POST /search`` with JSON: a stored image (``image_id``, ``listing_id`` when ids
    repeat) or a ``vector`` as the query; exactly one of them.

    The OpenAPI document gives ``vector`` the catalog's dimension (``minItems`` =
    ``maxItems`` = d) once the catalog has a model; another length is a 400."""

    model_config = ConfigDict(json_schema_extra=_one_query)

    image_id: LookupId = Field(  # type: ignore[assignment]  # absent is None; null is refused
        None, description="A stored image's id.", examples=["truck-17/front.jpg"]
    )
    listing_id: LookupId | None = Field(None, description="Its listing, when ids repeat.")
    vector: Vector = Field(
        None,  # type: ignore[arg-type]  # absent is None; null is refused (no | None)
        description=f"A query vector (normalized by the server); one component at least "
        f"needs a magnitude >= {VECTOR_MIN_PEAK:g}.",
    )

    @model_validator(mode="before")
    @classmethod
    def _json_query(cls, data: Any) -> Any:
        """Exactly one query, and JSON's own types: a number sent as text or a bool, or
        ``save`` sent as 0/1 or text, is refused (pydantic alone would convert them; a form
        carries every option as text, so the multipart options are converted)."""
        if not isinstance(data, dict):
            return data
        if ("image_id" in data) == ("vector" in data):
            raise ValueError("give exactly one of image_id and vector")
        for name in ("k", "top_n", "threshold"):
            if isinstance(data.get(name), bool | str):
                raise ValueError(f"{name} must be a JSON number, not {data[name]!r}")
        if "save" in data and not isinstance(data["save"], bool):
            raise ValueError(f"save must be true or false, not {data['save']!r}")
        vector = data.get("vector")
        if isinstance(vector, list) and any(isinstance(x, bool | str) for x in vector):
            raise ValueError("vector must hold JSON numbers only")
        return data

    def search_kwargs(self) -> dict[str, Any]:
        return self.model_dump(exclude={"image_id", "listing_id", "vector"})


@dataclass
class HitOut(Hit):
    """A :class:`lookalike.types.Hit` as HTTP answers it: with its thumbnail's URL and the
    score's band (``same image``, ``near copy``, ``similar``, ``unrelated``;
    :mod:`lookalike.analytics.bands`)."""

    thumbnail_url: str = field(kw_only=True)
    band: Literal["same image", "near copy", "similar", "unrelated"] | None = field(
        default=None, kw_only=True
    )


class SearchResponse(BaseModel):
    """The same JSON as ``lookalike search --format json`` (``SearchResult.to_dict()``), with
    a thumbnail URL per hit."""

    query_id: str
    hits: list[HitOut]


def search_response(
    result: SearchResult, band: Callable[[float], str] | None = None
) -> dict[str, Any]:
    """``result.to_dict()`` with ``thumbnail_url`` (and, given ``band``, the score's band)
    added to every hit."""
    out = result.to_dict()
    for hit in out["hits"]:
        hit["thumbnail_url"] = thumbnail_url(hit["image_id"], hit["listing_id"])
        if band is not None:
            hit["band"] = band(hit["score"])
    return out


# ------------------------------------------------------------------------------------ images


class ImageUpload(BaseModel):
    """``POST /images``: one image and its key (no other field)."""

    model_config = ConfigDict(extra="forbid")

    image: UploadFile = File(
        description="The image file (JPEG, PNG, WebP, GIF, BMP, ...: what Pillow decodes); an "
        "empty file is a 400, one that is no image a 415.",
        json_schema_extra={"format": "binary", "minLength": 1},
    )
    listing_id: Id = Field(examples=["truck-17"])
    image_id: Id = Field(examples=["truck-17/front.jpg"])


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
    """Result of ``DELETE /images/{image_id}`` and ``DELETE /results/{query_id}``: the id."""

    deleted: str


# ------------------------------------------------------------------------------------ listings


#: A JSON attribute value; null removes the attribute.
AttrValue = bool | int | float | str | None


def _http_problem(name: str, value: Any) -> str | None:
    """What the HTTP API refuses beyond the catalog's rules (JSON has types the catalog would
    convert): a number outside int64, float or not; a ``stock_level`` that is not a JSON number
    or not whole; an ``etag`` that is not text."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(value, float) and not math.isfinite(value):
        return f"listing attribute {name!r}: {value} is refused; numbers must be finite"
    if number and not INT64_MIN <= value < 2**63:  # 2**63 also for a float: exact in Python
        return f"listing attribute {name!r}: {value} is outside the int64 range"
    whole = number and not (isinstance(value, float) and not value.is_integer())
    if name == "stock_level" and value is not None and not whole:
        return f"listing attribute 'stock_level' must be a whole number or null, not {value!r}"
    if name == "etag" and value is not None and not isinstance(value, str):
        return f"listing attribute 'etag' must be text or null, not {value!r}"
    return None


def listing_attrs_schema() -> dict[str, Any]:
    """The JSON Schema of :class:`ListingAttrs`, written out: pydantic would give the value
    schema to a ``patternProperties`` of the name pattern, which other names escape. (The
    OpenAPI document puts it back as it is: FastAPI's document model turns the int64 bounds
    into floats, 2**63 - 1 into 2**63.)"""
    text = {"type": "string", "maxLength": MAX_ATTR_TEXT_LENGTH, "pattern": TEXT_PATTERN}
    number = {"minimum": INT64_MIN, "maximum": INT64_MAX}
    value = [text, {"type": "number", **number}, {"type": "boolean"}, {"type": "null"}]
    return {
        "type": "object",
        "title": "ListingAttrs",
        "description": inspect.cleandoc(ListingAttrs.__doc__ or ""),
        "propertyNames": {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_ATTR_NAME_LENGTH,
            "pattern": NAME_PATTERN,
            "not": {"const": "listing_id"},
        },
        "properties": {
            "stock_level": {"anyOf": [{"type": "integer", **number}, {"type": "null"}]},
            "etag": {"anyOf": [text, {"type": "null"}]},
        },
        "additionalProperties": {"anyOf": value},
    }


def _attrs_schema(schema: dict[str, Any]) -> None:
    schema.clear()
    schema.update(listing_attrs_schema())


class ListingAttrs(RootModel[dict[str, AttrValue]]):
    """The body of ``PUT /listings/{id}``: attribute name -> value (null removes it).

    Names: 1-128 characters, not only white space, no control character, not ``listing_id``.
    Values: text (at most 4096 characters, no control character), a number in the int64 range
    (integers and finite floats alike), a bool, or null; ``stock_level`` is a whole number and
    ``etag`` text (the catalog's rules, :mod:`lookalike.catalog.validate`, and
    :func:`_http_problem`). Anything else is a
    422 naming the attribute and the rule."""

    model_config = ConfigDict(json_schema_extra=_attrs_schema)

    @model_validator(mode="before")
    @classmethod
    def _checked(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError("the body must be a JSON object: attribute name -> value")
        for name, value in data.items():
            problem = _http_problem(name, value)
            if problem is not None:
                raise ValueError(problem)
        try:
            check_listing_attrs(data)
        except QueryError as exc:
            raise ValueError(str(exc)) from None
        return data


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
