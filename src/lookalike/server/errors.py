"""Error answers: the one table from exception type to HTTP status, and the handlers that
turn every error into JSON ``{"error": {"status", "message"}}``.

Backend exceptions (sqlite3, psycopg, nats) never reach these handlers as they are: the route
class (:class:`~lookalike.server.routing.ServerRoute`) passes them through
:func:`lookalike.errors.translate` first, so a locked SQLite database answers 503, not 500.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import (
    AmbiguousIdError,
    BrokerError,
    ImageError,
    LookalikeError,
    ModelMismatchError,
    NotFoundError,
    QueryError,
    SourceError,
    StoreBusyError,
    StoreError,
)

#: Project exception -> HTTP status. The most specific class along the exception's MRO wins
#: (``StoreBusyError`` before ``StoreError`` before ``LookalikeError``). An ambiguous image id
#: is a 409, not a 400: the request was valid before a second listing held that id.
STATUS: dict[type[LookalikeError], int] = {
    NotFoundError: 404,
    AmbiguousIdError: 409,
    ImageError: 415,
    ModelMismatchError: 409,
    QueryError: 400,
    SourceError: 400,
    StoreBusyError: 503,
    StoreError: 503,
    BrokerError: 502,
    LookalikeError: 400,
}
#: Seconds a client should wait before retrying a 503 (the store is busy or unreachable).
RETRY_AFTER_S = 1


def status_of(exc: LookalikeError) -> int:
    """The HTTP status of ``exc``: the :data:`STATUS` entry of its most specific class."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500  # unreachable: LookalikeError is in the table


#: An absolute POSIX path of two or more parts (its last part is kept).
_ABS_PATH = re.compile(r"(?<![\w/.~-])/(?:[^/\s'\"]+/)+(?=[^/\s'\"])")


def error_response(
    status: int, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The JSON error answer: ``{"error": {"status", "message"}}`` with ``status``."""
    extra = dict(headers or {})
    if status == 503:
        extra["Retry-After"] = str(RETRY_AFTER_S)
    body = {"error": {"status": status, "message": message}}
    return JSONResponse(body, status_code=status, headers=extra or None)


def scrub(request: Request, message: str) -> str:
    """``message`` without server paths: the catalog's location becomes its name, and any
    other absolute path its last part (error messages are read by anyone)."""
    state = getattr(request.app.state, "server", None)
    if state is not None:
        uri = str(state.catalog.uri)
        message = message.replace(uri, catalog_name(uri))
    return _ABS_PATH.sub("", message)


def catalog_name(uri: str) -> str:
    """What an unauthenticated client is told of the catalog's location: the last part of a
    folder's path, or the database name of a URL (no host, user or password)."""
    return uri.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0] or "catalog"


async def lookalike_error(request: Request, exc: Exception) -> JSONResponse:
    """A :class:`~lookalike.errors.LookalikeError`, answered with its :data:`STATUS`."""
    assert isinstance(exc, LookalikeError)
    return error_response(status_of(exc), scrub(request, str(exc)))


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    """An ``HTTPException`` (401, 404 of the router, 413, ...), as JSON, with its headers."""
    assert isinstance(exc, StarletteHTTPException)
    return error_response(exc.status_code, scrub(request, str(exc.detail)), exc.headers)


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    """A request that does not fit its declared schema: 422 naming the first bad field
    (``agg: Input should be ...``; query and path fields keep their ``query.``/``path.``)."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = list(first.get("loc", ()))
    if loc[:1] == ["body"] and len(loc) > 1:  # "agg: ...", whether sent as JSON or a form
        loc = loc[1:]
    where = ".".join(str(p) for p in loc)
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    return error_response(422, f"{where}: {message}")


def install(app: FastAPI) -> None:
    """Register the error handlers on ``app``."""
    app.add_exception_handler(LookalikeError, lookalike_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
