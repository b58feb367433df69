"""Exception types raised by lookalike.

Every error a user can cause derives from :class:`LookalikeError`, so callers can catch one
type; the CLI turns these into a one-line message and a non-zero exit code instead of a traceback.
"""

from __future__ import annotations


class LookalikeError(Exception):
    """Base class of every error lookalike raises on purpose."""


class ModelMismatchError(LookalikeError):
    """Vectors of one extractor (name, version or dimension) were offered to a catalog of
    another."""


class ImageError(LookalikeError):
    """An image could not be read or decoded; the message names the file and the reason."""


class QueryError(LookalikeError):
    """A search request is malformed: bad ``where`` expression, unknown id, NaN in a vector, ..."""


class SourceError(LookalikeError):
    """An ingest source (folder, list file, manifest) is missing or malformed; names file
    and row."""


class NotFoundError(LookalikeError):
    """A stored image or listing id does not exist in the catalog."""
