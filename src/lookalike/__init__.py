"""lookalike: semantic image search and real-time image recognition at scale.

The Python API (see ``DESIGN.md``)::

    import lookalike
    cat = lookalike.open_catalog("./cat")
    report = cat.index(["./photos"])
    result = cat.search("query.jpg", k=10, group_by="listing", where="stock_level > 0")

The package is layered (``DESIGN.md``, "Parts and where they live"): faces (``cli``,
``server``, ``stream``, ``spark``) -> services (``analytics``, ``recognize``, ``lake``,
``evaluate``, ``bench``, ``demo``) -> ``catalog`` -> parts (``engine``, ``store``, ``extract``,
``images``) -> base (``types``, ``errors``, ``values``, ``files``, ``devices``). A module imports
only from layers below its own; ``lint-imports`` checks it.
"""

from .catalog import Catalog, IndexReport, ReindexReport, open_catalog
from .errors import (
    BrokerError,
    ImageError,
    LookalikeError,
    ModelMismatchError,
    ModelVersionError,
    NotFoundError,
    QueryError,
    SourceError,
    StoreBusyError,
    StoreError,
)
from .extract import available_extractors, get_extractor
from .images import ImageSource
from .types import (
    Aggregation,
    CodeKind,
    EngineKind,
    GroupBy,
    Hit,
    IndexKind,
    ModelInfo,
    SearchResult,
    WriteStatus,
)

__version__ = "0.1.0"

__all__ = [
    "Aggregation",
    "BrokerError",
    "Catalog",
    "CodeKind",
    "EngineKind",
    "GroupBy",
    "Hit",
    "ImageError",
    "ImageSource",
    "IndexKind",
    "IndexReport",
    "LookalikeError",
    "ModelInfo",
    "ModelMismatchError",
    "ModelVersionError",
    "NotFoundError",
    "QueryError",
    "ReindexReport",
    "SearchResult",
    "SourceError",
    "StoreBusyError",
    "StoreError",
    "WriteStatus",
    "__version__",
    "available_extractors",
    "get_extractor",
    "open_catalog",
]
