"""The exception hierarchy of lookalike, and the one table that maps backend errors into it.

Every error a user can cause derives from :class:`LookalikeError`, so callers can catch one
type; the faces turn them into one line (CLI, with the README's exit codes) or a 4xx/5xx JSON
answer (HTTP), never a traceback.

Errors raised by backends (SQLite, PostgreSQL, the NATS client) are translated by
:func:`translate` through :data:`BACKEND_ERRORS`: the only place that knows their types. It
matches by qualified class name along the exception's MRO, so this module imports no backend
(and nothing of the project).
"""

from __future__ import annotations

import importlib
from typing import Any


class LookalikeError(Exception):
    """Base class of every error lookalike raises on purpose."""


class ModelMismatchError(LookalikeError):
    """Vectors of one extractor (name, version or dimension) were offered to a catalog of
    another."""


class ModelVersionError(ModelMismatchError):
    """The catalog's vectors come from another version of the extractor this install has
    (the extractor changed since they were made). Searches by vector or stored id still work;
    anything that embeds an image needs ``lookalike reindex`` first. The message names both
    versions and the command; HTTP answers 409, the CLI exits 1.

    Attributes:
        stored: the catalog's model tag (``name@version``). installed: this install's.
    """

    def __init__(self, message: str, stored: str = "", installed: str = "") -> None:
        super().__init__(message)
        self.stored = stored
        self.installed = installed


class ImageError(LookalikeError):
    """An image could not be read or decoded; the message names the file and the reason."""


class QueryError(LookalikeError):
    """A search request is malformed: bad ``where`` expression, unknown id, NaN in a vector, ..."""


class AmbiguousIdError(QueryError):
    """An image id without its listing id names images in several listings; the caller must
    say which (HTTP answers 409: the same request was fine before the second listing had it)."""


class SourceError(LookalikeError):
    """An ingest source (folder, list file, manifest) is missing or malformed; names file
    and row."""


class NotFoundError(LookalikeError):
    """A stored image or listing id does not exist in the catalog."""


class StoreError(LookalikeError):
    """The system of record cannot be used: locked, corrupt, read-only, or the database
    server cannot be reached. Usually temporary (``busy``) or an operator's problem."""


class StoreBusyError(StoreError):
    """The store is locked by another writer past the wait; retrying later may succeed."""


class BrokerError(LookalikeError):
    """The message broker (NATS JetStream) cannot be reached or refused a request."""


class MissingExtraError(LookalikeError):
    """A feature needs a package of an optional extra that is not installed.

    Args:
        module: the import name that failed (``pyarrow``).
        extra: the extra of ``pyproject.toml`` that installs it (``parquet``).
        feature: what needed it, in words (``Parquet manifests``).
    """

    def __init__(self, module: str, extra: str, feature: str) -> None:
        super().__init__(
            f"{feature} needs the package {module}, which is not installed: "
            f"pip install 'lookalike[{extra}]'"
        )
        self.module = module
        self.extra = extra


def optional_import(module: str, extra: str, feature: str) -> Any:
    """Import ``module`` (e.g. ``pyarrow.parquet``) of an optional extra.

    Returns:
        The module.

    Raises:
        MissingExtraError: it is not installed; the message names the extra to install.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(module.split(".")[0], extra, feature) from None


#: Backend exception (qualified class name) -> (project exception, what to tell the user).
#: The first entry that matches a class in the exception's MRO wins; ``{exc}`` is the
#: backend's own message. Order from specific to general.
BACKEND_ERRORS: tuple[tuple[str, type[LookalikeError], str], ...] = (
    # SQLite (stdlib sqlite3): "database is locked" is an OperationalError.
    ("sqlite3.OperationalError", StoreError, "catalog database error: {exc}"),
    ("sqlite3.DatabaseError", StoreError, "catalog database is damaged or not a catalog: {exc}"),
    ("sqlite3.Error", StoreError, "catalog database error: {exc}"),
    # PostgreSQL (psycopg 3, psycopg_pool).
    ("psycopg_pool.PoolTimeout", StoreError, "PostgreSQL cannot be reached: {exc}"),
    ("psycopg.OperationalError", StoreError, "PostgreSQL cannot be reached: {exc}"),
    ("psycopg.Error", StoreError, "PostgreSQL error: {exc}"),
    # Apache Spark (pyspark): a missing path or column in a job's input.
    (
        "pyspark.errors.exceptions.base.AnalysisException",
        QueryError,
        "Spark cannot read the input: {exc}",
    ),
    # NATS (nats-py).
    ("nats.errors.NoServersError", BrokerError, "NATS server cannot be reached: {exc}"),
    ("nats.errors.TimeoutError", BrokerError, "NATS request timed out: {exc}"),
    ("nats.js.errors.Error", BrokerError, "JetStream refused the request: {exc}"),
    ("nats.errors.Error", BrokerError, "NATS error: {exc}"),
)


def _qualname(cls: type) -> str:
    module = cls.__module__
    # psycopg defines its classes in psycopg.errors and re-exports them from psycopg.
    if module.startswith("psycopg.") and not module.startswith("psycopg_pool"):
        module = "psycopg"
    return f"{module}.{cls.__qualname__}"


def translate(exc: BaseException) -> LookalikeError | None:
    """The project exception for a backend exception, or None when ``exc`` is not one.

    A :class:`LookalikeError` is returned as it is. A ``sqlite3`` error whose message says the
    database is locked or busy becomes :class:`StoreBusyError`.
    """
    if isinstance(exc, LookalikeError):
        return exc
    names = {_qualname(cls) for cls in type(exc).__mro__}
    for name, kind, message in BACKEND_ERRORS:
        if name in names:
            text = str(exc).strip().split("\n", 1)[0] or type(exc).__name__
            if kind is StoreError and ("locked" in text or "busy" in text):
                kind = StoreBusyError
            return kind(message.format(exc=text))
    return None
