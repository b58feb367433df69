"""The catalog: the boundary between the faces and services above and the parts below.

One :class:`Catalog` binds one store, one extractor and one engine set; it is the only door to
the backends (``DESIGN.md``, "Layers"). Example::

    import lookalike
    cat = lookalike.open_catalog("./cat")
    report = cat.index(["./photos"])          # IndexReport(added, updated, skipped, failed)
    result = cat.search("query.jpg", k=10, group_by="listing")
    for hit in result.hits:
        print(hit.listing_id, hit.image_id, hit.score)

Modules: ``core`` (the :class:`Catalog` class: engine and search), ``base`` (shared state,
model checks, embedding), ``writes`` (ingest, adds, deletes, listing attributes, the
classifier), ``rows`` (reading stored rows, analysis columns, saved results, thumbnails),
``engines`` (vector cache sync, snapshots, engine choice, coalesced searches),
``cachesource`` (the cache from the engine files or the store), ``ingest`` (the batch ingest
pipeline),
``thumbs`` (the thumbnail cache), ``classifier`` (the saved classifier at run time),
``reindex`` (re-extracting with the installed extractor, resumable, one atomic swap),
``watch`` (watchlists: standing queries checked on every write, and the matches outbox).
"""

from .base import DEFAULT_EXTRACTOR, DEFAULT_K, DEFAULT_SETTINGS, ImageInput
from .classifier import Classifier
from .core import Catalog, open_catalog
from .engines import ANN_AUTO_BYTES
from .ingest import IndexReport
from .reindex import ReindexReport
from .watch import (
    MAX_WATCH_ENTRIES,
    WATCH_NAME,
    check_watch_name,
    default_entry_ids,
    match_event_id,
)

__all__ = [
    "ANN_AUTO_BYTES",
    "DEFAULT_EXTRACTOR",
    "DEFAULT_K",
    "DEFAULT_SETTINGS",
    "MAX_WATCH_ENTRIES",
    "WATCH_NAME",
    "Catalog",
    "Classifier",
    "ImageInput",
    "IndexReport",
    "ReindexReport",
    "check_watch_name",
    "default_entry_ids",
    "match_event_id",
    "open_catalog",
]
