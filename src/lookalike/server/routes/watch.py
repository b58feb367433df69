"""Watchlists over HTTP: ``GET /watchlists``, ``GET /watchlists/{name}``, ``POST /watchlists``
(JSON: stored images or vectors), ``POST /watchlists/{name}/images`` (one uploaded image),
``DELETE /watchlists/{name}`` and ``DELETE /watchlists/{name}/{entry_id}``,
``GET /watchlists/{name}/hits``.

Changes need the write token when the server has one; reads follow the read rules of the other
reads. A change applies to the next write batch of every process writing to the catalog (see
:mod:`lookalike.catalog.watch`). Without a ``threshold``, entries get the catalog's calibrated
near-duplicate threshold (else its extractor's). The request and response models live here,
next to the routes that use them.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, File, Form, HTTPException, Path, Query, UploadFile
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from ...analytics.calibrate import near_duplicate_threshold
from ...catalog import Catalog
from ...types import Key, MatchRecord, WatchEntry
from ..deps import READ, WRITE, CatalogDep, StateDep, read_upload
from ..routing import ServerRoute
from ..schemas import ERRORS, Id, thumbnail_url

router = APIRouter(route_class=ServerRoute, tags=["watchlists"], responses=ERRORS)

#: A watchlist name: a NATS subject token (``lookalike.watch.<name>``).
NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
WatchName = Annotated[str, Field(pattern=NAME_PATTERN, description="The watchlist.")]
NamePath = Annotated[str, Path(pattern=NAME_PATTERN, description="The watchlist.")]
Threshold = Annotated[
    float | None,
    Field(
        ge=-1.0,
        le=1.0,
        description="Match when score > threshold; default: the catalog's calibrated "
        "near-duplicate threshold.",
    ),
]
#: Most entries one request may add.
MAX_ENTRIES_PER_REQUEST = 1000


class EntryIn(BaseModel):
    """One entry to add: a stored image (``image_id``, ``listing_id`` when ids repeat) or a
    ``vector`` (then ``entry_id`` is required)."""

    entry_id: Id | None = Field(None, description="Default: the stored image's id.")
    image_id: Id | None = None
    listing_id: Id | None = None
    vector: list[float] | None = Field(None, min_length=1, max_length=65_536)


class WatchlistIn(BaseModel):
    """``POST /watchlists``: entries to add to watchlist ``name`` (created on first use)."""

    name: WatchName
    threshold: Threshold = None
    entries: list[EntryIn] = Field(min_length=1, max_length=MAX_ENTRIES_PER_REQUEST)


class EntryUpload(BaseModel):
    """``POST /watchlists/{name}/images``: one image (embedded by the catalog's extractor)."""

    image: UploadFile = File(description="The reference image.")
    entry_id: Id
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


class HitsOut(BaseModel):
    """The newest matches of a watchlist, oldest first."""

    name: str
    hits: list[MatchOut]


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


@router.get(
    "/watchlists", response_model=WatchlistsOut, dependencies=READ, summary="Every watchlist"
)
def list_watchlists(cat: CatalogDep) -> dict[str, Any]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for e in cat.watch_entries():
        groups.setdefault(e.name, []).append(entry_out(e))
    return {"watchlists": [{"name": n, "entries": es} for n, es in groups.items()]}


@router.get(
    "/watchlists/{name}",
    response_model=WatchlistOut,
    dependencies=READ,
    summary="One watchlist's entries",
)
def get_watchlist(name: NamePath, cat: CatalogDep) -> dict[str, Any]:
    return _watchlist(cat, name)


@router.post(
    "/watchlists",
    response_model=WatchlistOut,
    dependencies=WRITE,
    summary="Add stored images or vectors to a watchlist (created on first use)",
)
def add_to_watchlist(req: WatchlistIn, cat: CatalogDep) -> dict[str, Any]:
    stored: list[Key] = []
    stored_ids: list[str | None] = []
    vectors, vector_ids = [], []
    for i, e in enumerate(req.entries):
        if (e.image_id is None) == (e.vector is None):
            raise HTTPException(422, f"entry {i}: give exactly one of image_id and vector")
        if e.image_id is not None:
            stored.append(cat.resolve_key(e.image_id, e.listing_id))
            stored_ids.append(e.entry_id)
        elif e.entry_id is None:
            raise HTTPException(422, f"entry {i}: a vector needs an entry_id")
        else:
            vectors.append(e.vector)
            vector_ids.append(e.entry_id)
    threshold = _threshold(cat, req.threshold)
    if vectors:
        dims = {len(v or ()) for v in vectors}
        if len(dims) != 1:
            raise HTTPException(422, "the vectors differ in length")
        cat.watch_add(req.name, np.asarray(vectors, dtype=np.float64), vector_ids, threshold)
    if stored:
        cat.watch_add_stored(req.name, stored, threshold, stored_ids)
    return _watchlist(cat, req.name)


@router.post(
    "/watchlists/{name}/images",
    response_model=WatchlistOut,
    dependencies=WRITE,
    summary="Add one uploaded image to a watchlist (created on first use)",
)
async def add_image_to_watchlist(
    name: NamePath,
    form: Annotated[EntryUpload, Form(media_type="multipart/form-data")],
    state: StateDep,
) -> dict[str, Any]:
    cat = state.catalog
    data = await read_upload(form.image, state.settings)
    threshold = await run_in_threadpool(_threshold, cat, form.threshold)
    source = form.image.filename or "upload"
    async with state.decodes.hold():
        await run_in_threadpool(
            cat.watch_add_images, name, [data], [form.entry_id], threshold, [source]
        )
    return await run_in_threadpool(_watchlist, cat, name)


@router.delete(
    "/watchlists/{name}",
    response_model=Removed,
    dependencies=WRITE,
    summary="Remove a watchlist (its recorded hits stay)",
)
def remove_watchlist(name: NamePath, cat: CatalogDep) -> dict[str, int]:
    return {"removed": cat.watch_remove(name)}


@router.get(
    "/watchlists/{name}/hits",
    response_model=HitsOut,
    dependencies=READ,
    summary="The newest images that matched a watchlist",
)
def watchlist_hits(
    name: NamePath,
    cat: CatalogDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    return {"name": name, "hits": [match_out(m) for m in cat.watch_hits(name, limit)]}


@router.delete(
    "/watchlists/{name}/{entry_id:path}",
    response_model=Removed,
    dependencies=WRITE,
    summary="Remove one entry of a watchlist",
)
def remove_entry(
    name: NamePath,
    entry_id: Annotated[str, Path(min_length=1, max_length=1024)],
    cat: CatalogDep,
) -> dict[str, int]:
    return {"removed": cat.watch_remove(name, entry_id)}
