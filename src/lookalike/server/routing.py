"""How requests reach the handlers: the route classes, the streaming body limit, and the
OpenAPI document of an operation that takes more than one media type.

* :class:`ServerRoute`, the route class of every router: backend exceptions go through
  :func:`lookalike.errors.translate` (so the one error table answers them), and multipart
  forms are parsed with the server's limits (one file, a few fields).
* :class:`MediaTypeRoute`: a route that only matches requests of the media type its body
  declares, so ``POST /search`` is two declared operations (multipart upload, JSON) on one
  path and method; :func:`openapi` merges them into one operation with both bodies.
* :class:`BodyLimit`: refuses (413) a request body past its limit (``max_upload`` plus
  slack for a multipart upload, ``max_json`` for anything else) from its Content-Length
  before reading, or while it streams (chunked), before it is spooled to disk.
* :class:`CatchAll`: an exception nothing else answered becomes the JSON 500, logged once.

A method no route of a path takes is a 405 whose ``Allow`` header lists the methods every
route of that path takes (Starlette names only the first route's).
"""

from __future__ import annotations

import email.message
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute, iter_route_contexts
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import translate
from .deps import CLOSE, Access, check_access, require_read, require_token
from .errors import error_response
from .state import MAX_FIELDS, MAX_FILES, ServerState

log = logging.getLogger("lookalike.server")

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

    The token a route depends on (``require_token``: write, ``require_read``: read) is checked
    first, before the body is read: a refused request costs its headers, not its upload.
    """

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()
        form = self.body_field is not None and media_type(self._body_media()) == (
            "multipart/form-data"
        )
        need = self.needs()

        async def translated(request: Request) -> Response:
            if need is not None:
                state: ServerState = request.app.state.server
                check_access(state.settings, request.headers.get("authorization"), need)
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

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer the request; a method this route does not take is a 405 whose ``Allow``
        names the methods of every route of the path (:func:`allowed_methods`)."""
        if self.methods and scope["method"] not in self.methods:
            allow = ", ".join(allowed_methods(scope))
            raise HTTPException(
                405, f"{scope['method']} is not allowed here; use {allow}", {"Allow": allow}
            )
        await super().handle(scope, receive, send)

    def needs(self) -> Access:
        """The access this route's dependencies ask for (write before read)."""
        found = {dep.call for dep in self.dependant.dependencies}
        if require_token in found:
            return "write"
        if require_read in found:
            return "read"
        return None


def allowed_methods(scope: Scope) -> list[str]:
    """The methods the routes of the request's path take (HEAD with GET), sorted (routers are
    included without a prefix)."""
    methods: set[str] = set()
    for context in iter_route_contexts(scope["app"].routes):
        route = context.original_route
        if isinstance(route, APIRoute) and route.methods:
            match, _ = APIRoute.matches(route, scope)  # the path alone, not the media type
            if match is not Match.NONE:
                methods |= route.methods
    return sorted(methods)


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
    """ASGI middleware: a request body over its limit is refused with 413.

    The limit is ``upload_limit`` for ``multipart/form-data`` and ``json_limit`` for any other
    body. A Content-Length over it is refused before anything is read; a body that streams
    past it (chunked) is cut off as soon as it does. The error is raised from ``receive``
    inside the handler, so the JSON error handler answers it (and closes the connection).
    """

    def __init__(self, app: ASGIApp, limit: int, json_limit: int | None = None) -> None:
        self.app = app
        self.limit = limit
        self.json_limit = limit if json_limit is None else json_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        ctype = media_type(headers.get(b"content-type", b"").decode("latin-1"))
        limit = self.limit if ctype == "multipart/form-data" else self.json_limit
        declared = headers.get(b"content-length", b"").decode("latin-1").strip()
        seen = 0

        def refuse() -> HTTPException:
            what = "multipart " if limit == self.limit else ""
            return HTTPException(
                413, f"{what}request body is over the {limit}-byte limit", headers=CLOSE
            )

        async def limited() -> Message:
            nonlocal seen
            if declared.isdigit() and int(declared) > limit:
                raise refuse()
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise refuse()
            return message

        await self.app(scope, limited, send)


class CatchAll:
    """ASGI middleware: an exception no handler answered becomes the JSON error shape with
    status 500 (``internal error``), logged once as one line plus its traceback. The
    exception goes no further, so the server does not log it again nor drop a keep-alive
    connection. When the answer had already started there is nothing to send: logged only.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as exc:
            summary = " ".join(str(exc).split())[:200]
            log.error(
                "internal error answering %s %s: %s: %s",
                scope.get("method"),
                scope.get("path"),
                type(exc).__name__,
                summary,
                exc_info=exc,
            )
            if not started:
                response = error_response(500, f"internal error ({type(exc).__name__})")
                await response(scope, receive, send)
