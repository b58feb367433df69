"""lookalike: semantic image search and real-time image recognition at scale.

The Python API (see ``DESIGN.md``)::

    import lookalike
    cat = lookalike.open_catalog("./cat")
    report = cat.index(["./photos"])
    result = cat.search("query.jpg", k=10, group_by="listing", where="stock_level > 0")
"""

from .catalog import Catalog, IndexReport, open_catalog
from .errors import (
    ImageError,
    LookalikeError,
    ModelMismatchError,
    NotFoundError,
    QueryError,
    SourceError,
)
from .extract import available_extractors, get_extractor
from .images import ImageSource
from .types import Hit, ModelInfo, SearchResult

__version__ = "0.1.0"

__all__ = [
    "Catalog",
    "Hit",
    "ImageError",
    "ImageSource",
    "IndexReport",
    "LookalikeError",
    "ModelInfo",
    "ModelMismatchError",
    "NotFoundError",
    "QueryError",
    "SearchResult",
    "SourceError",
    "__version__",
    "available_extractors",
    "get_extractor",
    "open_catalog",
]
