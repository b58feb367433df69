"""How requests reach the handlers: the route classes, the streaming body limit, and the
OpenAPI document of an operation that takes more than one media type.

* :class:`ServerRoute`, the route class of every router: backend exceptions go through
  :func:`lookalike.errors.translate` (so the one error table answers them), and multipart
  forms are parsed with the server's limits (one file, a few fields).
* :class:`MediaTypeRoute`: a route that only matches requests of the media type its body
  declares, so ``POST /search`` is two declared operations (multipart upload, JSON) on one
  path and method; :func:`openapi` merges them into one operation with both bodies.
* :class:`BodyLimit`: refuses (413) a request body past ``max_upload`` plus slack while it
  streams, before it is spooled to disk.
"""

from __future__ import annotations

import email.message
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute, iter_route_contexts
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import translate
from .state import MAX_FIELDS, MAX_FILES

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


def media_type(content_type: str | None) -> str:
    """``"type/subtype"`` of a Content-Type header, lower case ("" when absent)."""
    if not content_type:
        return ""
    message = email.message.Message()
    message["content-type"] = content_type
    return message.get_content_type() if "/" in content_type else ""


class ServerRoute(APIRoute):
    """The route class of every server router.

    Backend exceptions (``sqlite3.OperationalError``, psycopg, nats) raised by a handler or a
    dependency are translated into the project's exceptions, which the error table maps to a
    status; anything else is raised as it is. A multipart body is parsed with
    :data:`~lookalike.server.state.MAX_FILES` / ``MAX_FIELDS`` (Starlette caches the form, so
    FastAPI's own parse reuses it).
    """

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()
        form = self.body_field is not None and media_type(self._body_media()) == (
            "multipart/form-data"
        )

        async def translated(request: Request) -> Response:
            try:
                if form and media_type(request.headers.get("content-type")) == (
                    "multipart/form-data"
                ):
                    await request.form(max_files=MAX_FILES, max_fields=MAX_FIELDS)
                return await handler(request)
            except Exception as exc:
                mapped = translate(exc)
                if mapped is None or mapped is exc:
                    raise
                raise mapped from exc

        return translated

    def _body_media(self) -> str | None:
        info = getattr(self.body_field, "field_info", None)
        return getattr(info, "media_type", None)


class MediaTypeRoute(ServerRoute):
    """A route that matches only requests of its body's declared media type
    (``multipart/form-data`` for ``Form``/``File`` bodies, ``application/json`` for models),
    so several declared operations can share one path and method. A route without a body
    matches any request: put it last as the fallback (e.g. 415)."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match is Match.FULL and self.body_field is not None:
            headers = dict(scope.get("headers") or [])
            ctype = media_type(headers.get(b"content-type", b"").decode("latin-1"))
            if not _accepts(self._body_media() or "application/json", ctype):
                return Match.NONE, {}
        return match, child


def _accepts(declared: str, ctype: str) -> bool:
    if declared == "application/json":
        return ctype == "application/json" or (
            ctype.startswith("application/") and ctype.endswith("+json")
        )
    return ctype == declared


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is refused with 413.

    A Content-Length over the limit is refused before anything is read; a body that streams
    past it (chunked) is cut off as soon as it does. The error is raised from ``receive``
    inside the handler, so the JSON error handler answers it.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode("latin-1")
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            if declared.isdigit() and int(declared) > limit:
                raise HTTPException(413, f"request body is over the {limit}-byte limit")
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, f"request body is over the {limit}-byte limit")
            return message

        await self.app(scope, limited, send)


def openapi(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document of ``app``, with the :class:`MediaTypeRoute` operations that share
    a path and method merged into one operation whose request body lists every media type
    (FastAPI alone keeps only the last); the first declared route gives the operation's id,
    summary and description. Cached on ``app.openapi_schema``."""
    if app.openapi_schema:
        return app.openapi_schema

    def document(routes: list[Any]) -> dict[str, Any]:
        return get_openapi(
            title=app.title, version=app.version, description=app.description, routes=routes
        )

    schema = document(app.routes)
    shared: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for context in iter_route_contexts(app.routes):
        route = context.original_route
        if isinstance(route, MediaTypeRoute) and route.include_in_schema and route.body_field:
            for path, item in document([context])["paths"].items():
                for method, operation in item.items():
                    shared.setdefault((path, method), []).append(operation)
    for (path, method), operations in shared.items():
        if len(operations) < 2:
            continue
        merged = operations[0]
        merged["requestBody"] = {
            "required": all(op["requestBody"].get("required", False) for op in operations),
            "content": {
                media: body
                for op in operations
                for media, body in op["requestBody"]["content"].items()
            },
        }
        schema["paths"][path][method] = merged
    app.openapi_schema = schema
    return schema
