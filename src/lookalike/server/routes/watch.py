"""Watchlists over HTTP: ``GET /watchlists``, ``GET /watchlists/{name}``, ``POST /watchlists``
(JSON: stored images or vectors; or multipart/form-data: one uploaded image, the two bodies of
one operation as in ``POST /search``), ``DELETE /watchlists/{name}`` and
``DELETE /watchlists/{name}/entries/{entry_id}``; and
``GET /matches`` (the recorded matches, of one watchlist when asked: they outlive a removed
watchlist, so they are not a part of ``/watchlists/{name}``).

Changes need the write token when the server has one; reads follow the read rules of the other
reads (both checked before the body is read). A change applies to the next write batch of
every process writing to the catalog (see :mod:`lookalike.catalog.watch`). Without a
``threshold``, entries get the catalog's calibrated near-duplicate threshold (else its
extractor's). The request and response models live here, next to the routes that use them;
every rule they enforce is in the OpenAPI document (``tests/test_openapi_contract.py``).

``POST /watchlists`` adds at most :data:`MAX_ENTRIES_PER_REQUEST` entries in one transaction;
an entry id given twice in one request keeps the later entry (as a later request would).
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, File, Form, HTTPException, Path, Query, UploadFile
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag
from starlette.concurrency import run_in_threadpool

from ...analytics.calibrate import near_duplicate_threshold
from ...catalog import MAX_WATCH_ENTRIES, Catalog, default_entry_ids
from ...errors import ModelMismatchError
from ...types import MAX_ID_LENGTH, Key, MatchRecord, WatchEntry
from ..deps import READ, WRITE, CatalogDep, StateDep, read_upload
from ..routing import MediaTypeRoute
from ..schemas import ERRORS, LOOKUP_PATTERN, Id, Vector, form_schema, thumbnail_url

#: Media type routes: ``POST /watchlists`` is a JSON and a multipart operation on one path.
router = APIRouter(route_class=MediaTypeRoute, tags=["watchlists"], responses=ERRORS)

#: A watchlist name: a NATS subject token (``lookalike.watch.<name>``); the catalog's
#: :data:`lookalike.catalog.WATCH_NAME`.
NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
WatchName = Annotated[str, Field(pattern=NAME_PATTERN, description="The watchlist.")]
NamePath = Annotated[str, Path(pattern=NAME_PATTERN, description="The watchlist.")]
Threshold = Annotated[
    float | None,
    Field(
        ge=-1.0,
        le=1.0,
        description="Match when score > threshold (a cosine); default: the catalog's "
        "calibrated near-duplicate threshold.",
    ),
]
#: Most entries one ``POST /watchlists`` may add: 64 vectors of d = 1280, each number written
#: with 17 significant digits (~25 bytes), are ~2 MB, the server's JSON body limit.
MAX_ENTRIES_PER_REQUEST = 64


class WatchStoredEntry(BaseModel):
    """An entry taken from a stored image (its vector): ``image_id``, and ``listing_id`` when
    the id is in several listings. ``entry_id`` defaults to the image id (``listing_id/
    image_id`` when the request names the same image id in several listings)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    image_id: Id = Field(examples=["moon/moon-05.jpg"])
    listing_id: Id | None = Field(None, description="Its listing, when ids repeat.")
    entry_id: Id | None = Field(None, description="Default: the image id.")


class WatchVectorEntry(BaseModel):
    """An entry given as a vector (the catalog's dimension; normalized by the server)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    entry_id: Id
    vector: Vector


def _entry_kind(entry: Any) -> str:
    """Which kind of entry ``entry`` is meant to be: one with a ``vector`` is a vector entry,
    anything else a stored image (so a 422 names the fields of the kind that was meant)."""
    if isinstance(entry, dict):
        return "vector" if "vector" in entry else "stored"
    return "vector" if isinstance(entry, WatchVectorEntry) else "stored"


#: One entry of ``POST /watchlists``: a stored image or a vector (``oneOf`` in the document).
Entry = Annotated[
    Annotated[WatchStoredEntry, Tag("stored")] | Annotated[WatchVectorEntry, Tag("vector")],
    Discriminator(_entry_kind),
]


class WatchlistAdd(BaseModel):
    """``POST /watchlists``: entries to add to watchlist ``name`` (created on first use), each
    a stored image or a vector. JSON's own types only (``"0.9"`` is no threshold)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: WatchName = Field(examples=["stolen"])
    threshold: Threshold = None
    entries: list[Entry] = Field(min_length=1, max_length=MAX_ENTRIES_PER_REQUEST)


class WatchEntryUpload(BaseModel):
    """``POST /watchlists`` with multipart/form-data: one reference image (embedded by the
    catalog's extractor), the watchlist, the entry id and threshold (no other field)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=form_schema)

    image: UploadFile = File(
        description="The reference image (JPEG, PNG, WebP, GIF, BMP, ...: what Pillow decodes); "
        "an empty file is a 400, one that is no image a 415.",
        json_schema_extra={"format": "binary", "minLength": 1},
    )
    name: WatchName = Field(examples=["stolen"])
    entry_id: Id = Field(examples=["stolen-1"])
    threshold: Threshold = None


class WatchEntryOut(BaseModel):
    """A watchlist entry (``WatchEntry`` without its vector) and its thumbnail, when it was
    taken from a stored image."""

    name: str
    entry_id: str
    threshold: float
    source: str | None
    ref_listing_id: str | None
    ref_image_id: str | None
    created_at: float
    thumbnail_url: str | None


class WatchlistOut(BaseModel):
    """One watchlist and its entries."""

    name: str
    entries: list[WatchEntryOut]


class WatchlistsOut(BaseModel):
    """Every watchlist."""

    watchlists: list[WatchlistOut]


class MatchOut(BaseModel):
    """A recorded match (``MatchRecord``): the arriving image, the entry (or catalog image)
    it matched, the score, when, and whether its event was published yet."""

    id: int
    event_id: str
    listing_id: str
    image_id: str
    sha256: str
    watchlist: str | None
    entry_id: str | None
    hit_listing_id: str | None
    hit_image_id: str | None
    score: float
    matched_at: float
    published_at: float | None
    thumbnail_url: str
    hit_thumbnail_url: str | None


class MatchesOut(BaseModel):
    """The newest recorded matches (of one watchlist, when asked), oldest first."""

    watchlist: str | None
    matches: list[MatchOut]


class Removed(BaseModel):
    """Entries removed."""

    removed: int


def entry_out(e: WatchEntry) -> dict[str, Any]:
    """A :class:`WatchEntryOut` of an entry."""
    thumb = None
    if e.ref_listing_id is not None and e.ref_image_id is not None:
        thumb = thumbnail_url(e.ref_image_id, e.ref_listing_id)
    return {**e.to_dict(), "thumbnail_url": thumb}


def match_out(m: MatchRecord) -> dict[str, Any]:
    """A :class:`MatchOut` of a recorded match (also the ``match`` events of ``/live``)."""
    hit = None
    if m.hit_listing_id is not None and m.hit_image_id is not None:
        hit = thumbnail_url(m.hit_image_id, m.hit_listing_id)
    return {
        **m.to_dict(),
        "thumbnail_url": thumbnail_url(m.image_id, m.listing_id),
        "hit_thumbnail_url": hit,
    }


def _watchlist(cat: Catalog, name: str) -> dict[str, Any]:
    return {"name": name, "entries": [entry_out(e) for e in cat.watch_entries(name)]}


def _threshold(cat: Catalog, threshold: float | None) -> float:
    return near_duplicate_threshold(cat)[0] if threshold is None else threshold


#: Where an added watchlist leads (OpenAPI links of the ``POST`` routes).
WATCHLIST_LINKS = {
    "GetWatchlist": {
        "operationId": "get_watchlist",
        "parameters": {"path.name": "$response.body#/name"},
        "description": "The watchlist's entries.",
    },
    "RemoveWatchlist": {
        "operationId": "remove_watchlist",
        "parameters": {"path.name": "$response.body#/name"},
        "description": "Remove the watchlist.",
    },
}
#: The answer of a change (the watchlist) and where it leads.
CHANGED: dict[int | str, dict[str, Any]] = {200: {"links": WATCHLIST_LINKS}}


@router.get(
    "/watchlists",
    operation_id="list_watchlists",
    response_model=WatchlistsOut,
    dependencies=READ,
    summary="Every watchlist",
)
def list_watchlists(cat: CatalogDep) -> dict[str, Any]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for e in cat.watch_entries():
        groups.setdefault(e.name, []).append(entry_out(e))
    return {"watchlists": [{"name": n, "entries": es} for n, es in groups.items()]}


@router.get(
    "/watchlists/{name}",
    operation_id="get_watchlist",
    response_model=WatchlistOut,
    dependencies=READ,
    summary="One watchlist's entries (404 when it has none)",
)
def get_watchlist(name: NamePath, cat: CatalogDep) -> dict[str, Any]:
    return _watchlist(cat, name)


@router.post(
    "/watchlists",
    operation_id="add_to_watchlist",
    response_model=WatchlistOut,
    responses=CHANGED,
    dependencies=WRITE,
    summary="Add stored images, vectors or an uploaded image to a watchlist (created on first use)",
    description="JSON: stored images or vectors, at most "
    f"{MAX_ENTRIES_PER_REQUEST} entries per request, written in one transaction; an entry id "
    "given twice keeps the later entry. An image that is not stored is a 404 (nothing is "
    "written); a vector of another dimension than the catalog's a 409. Multipart: one image "
    "(field `image`), with the limits of POST /images (413 over the upload limit, 415 over "
    "the pixel limit or not an image, 400 empty). An existing entry id is replaced; a "
    f"watchlist past {MAX_WATCH_ENTRIES} entries is a 400.",
)
def add_to_watchlist(req: WatchlistAdd, cat: CatalogDep) -> dict[str, Any]:
    rows = _entry_rows(cat, req.entries)
    vectors = [v for v, _, _ in rows.values()]
    if len({len(v) for v in vectors}) > 1:
        raise ModelMismatchError("the entries' vectors differ in length")
    cat.watch_add(
        req.name,
        np.asarray(vectors, dtype=np.float64),
        list(rows),
        _threshold(cat, req.threshold),
        sources=[source for _, source, _ in rows.values()],
        refs=[ref for _, _, ref in rows.values()],
    )
    return _watchlist(cat, req.name)


def _entry_rows(
    cat: Catalog, entries: list[Entry]
) -> dict[str, tuple[Any, str | None, Key | None]]:
    """Entry id -> (vector, source, stored key) of the request's entries, in order (a later
    entry of the same id replaces the earlier). Raises NotFoundError for an image not stored,
    before anything is written."""
    stored = [
        cat.get_image(e.image_id, e.listing_id) for e in entries if isinstance(e, WatchStoredEntry)
    ]
    defaults = iter(default_entry_ids([(r.listing_id, r.image_id) for r in stored]))
    records = iter(stored)
    rows: dict[str, tuple[Any, str | None, Key | None]] = {}
    for e in entries:
        if isinstance(e, WatchVectorEntry):
            rows[e.entry_id] = (e.vector, None, None)
            continue
        rec, default = next(records), next(defaults)
        rows[e.entry_id or default] = (
            rec.vector,
            f"stored {rec.image_id}",
            (rec.listing_id, rec.image_id),
        )
    return rows


@router.post(
    "/watchlists",
    operation_id="add_watchlist_image",
    response_model=WatchlistOut,
    responses=CHANGED,
    dependencies=WRITE,
    summary="Add one uploaded image to a watchlist (created on first use)",
)
async def add_image_to_watchlist(
    form: Annotated[WatchEntryUpload, Form(media_type="multipart/form-data")],
    state: StateDep,
) -> dict[str, Any]:
    cat, name = state.catalog, form.name
    data = await read_upload(form.image, state.settings)
    threshold = await run_in_threadpool(_threshold, cat, form.threshold)
    source = form.image.filename or "upload"
    async with state.decodes.hold():
        await run_in_threadpool(
            cat.watch_add_images, name, [data], [form.entry_id], threshold, [source]
        )
    return await run_in_threadpool(_watchlist, cat, name)


@router.post("/watchlists", dependencies=WRITE, include_in_schema=False)
def add_other_media() -> None:
    """Neither JSON nor multipart: 415."""
    raise HTTPException(415, "send JSON (entries) or multipart/form-data (field image)")


@router.delete(
    "/watchlists/{name}",
    operation_id="remove_watchlist",
    response_model=Removed,
    dependencies=WRITE,
    summary="Remove a watchlist (its recorded hits stay)",
)
def remove_watchlist(name: NamePath, cat: CatalogDep) -> dict[str, int]:
    return {"removed": cat.watch_remove(name)}


@router.get(
    "/matches",
    operation_id="list_matches",
    response_model=MatchesOut,
    dependencies=READ,
    summary="The newest recorded matches: watchlist hits (also of a removed watchlist) and "
    "catalog near-duplicates found on arrival",
)
def list_matches(
    cat: CatalogDep,
    watchlist: Annotated[
        str | None, Query(pattern=NAME_PATTERN, description="Only this watchlist's matches.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="Most matches answered.")] = 100,
) -> dict[str, Any]:
    rows = newest_matches(cat, limit, watchlist)
    return {"watchlist": watchlist, "matches": [match_out(m) for m in rows]}


def newest_matches(cat: Catalog, n: int, watchlist: str | None) -> list[MatchRecord]:
    """The newest ``n`` recorded matches, oldest first: of ``watchlist``, or all of them."""
    return cat.latest_matches(n) if watchlist is None else cat.watch_hits(watchlist, n)


@router.delete(
    "/watchlists/{name}/entries/{entry_id:path}",
    operation_id="remove_watchlist_entry",
    response_model=Removed,
    dependencies=WRITE,
    summary="Remove one entry of a watchlist (404 when it has no such entry)",
)
def remove_entry(
    name: NamePath,
    entry_id: Annotated[
        str,
        Path(
            min_length=1,
            max_length=MAX_ID_LENGTH,
            pattern=LOOKUP_PATTERN,
            description="The entry (it may contain '/').",
        ),
    ],
    cat: CatalogDep,
) -> dict[str, int]:
    return {"removed": cat.watch_remove(name, entry_id)}
