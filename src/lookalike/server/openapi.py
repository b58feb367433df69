"""The OpenAPI document (``GET /openapi.json``): FastAPI's, completed with what the server
enforces that FastAPI cannot see.

* Operations that share a path and method (:class:`~lookalike.server.routing.MediaTypeRoute`:
  ``POST /search``, multipart or JSON) become one operation listing both request bodies.
* Tokens are a ``bearer`` security scheme, not an ``Authorization`` header parameter: write
  operations require it when the server has a write token, reads when it has a read token;
  ``POST /search`` takes it optionally (``save=true`` needs the write token) when only writes
  are guarded.
* Error answers are JSON on every operation (FastAPI documents them in a route's own media
  type, text/plain for ``/metrics``).
* A multipart image part declares the image media types it may carry (``encoding``).
* ``vector`` of a JSON search and of a watchlist entry has the catalog's dimension
  (``minItems`` = ``maxItems`` = d) once the catalog has a model; the document is rebuilt
  when that changes.

The constraints of the fields themselves (id patterns, ranges, enums, lengths) are those of
the pydantic models and parameters in :mod:`lookalike.server.schemas` and the routes, which
the server enforces; links between operations are declared on the routes.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import iter_route_contexts

from .routing import MediaTypeRoute, ServerRoute
from .schemas import IMAGE_TYPES, listing_attrs_schema
from .state import ServerState

#: The security scheme of both tokens.
BEARER = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "The server's write token (writes, save=true) or read token (reads, "
        "when the server has one); the write token grants reads too.",
    }
}
#: Read operations that write when asked to (``save=true``): the write token is optional.
SAVING = frozenset({"search"})
#: Request models whose ``vector`` has the catalog's dimension.
VECTOR_MODELS = ("SearchRequest", "WatchVectorEntry")


def document(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document of ``app`` (see the module docstring), cached per catalog
    dimension on ``app.openapi_schema``."""
    state: ServerState = app.state.server
    model = state.catalog.model
    dim = model.dim if model is not None else None
    if app.openapi_schema and getattr(app.state, "openapi_dim", None) == dim:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    _merge_media_types(app, schema)
    _security(app, schema)
    _json_errors(schema)
    components = schema.get("components", {}).get("schemas", {})
    for item in schema["paths"].values():
        for operation in item.values():
            _image_encoding(operation, components)
    if "ListingAttrs" in components:
        components["ListingAttrs"] = listing_attrs_schema()
    for name in VECTOR_MODELS:
        vector = components.get(name, {}).get("properties", {}).get("vector")
        if vector is not None and dim is not None:
            vector.update(minItems=dim, maxItems=dim)
    app.state.openapi_dim = dim
    app.openapi_schema = schema
    return schema


def _merge_media_types(app: FastAPI, schema: dict[str, Any]) -> None:
    """One operation per path and method, with the request bodies of every
    :class:`MediaTypeRoute` declared there (FastAPI alone keeps the last); the first declared
    route gives the operation's id, summary and description."""
    shared: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for context in iter_route_contexts(app.routes):
        route = context.original_route
        if isinstance(route, MediaTypeRoute) and route.include_in_schema and route.body_field:
            one = get_openapi(title=app.title, version=app.version, routes=[context])
            for path, item in one["paths"].items():
                for method, operation in item.items():
                    shared.setdefault((path, method), []).append(operation)
    for (path, method), operations in shared.items():
        if len(operations) < 2:
            continue
        merged = copy.deepcopy(operations[0])
        merged["requestBody"] = {
            "required": all(op["requestBody"].get("required", False) for op in operations),
            "content": {
                media: body
                for op in operations
                for media, body in op["requestBody"]["content"].items()
            },
        }
        schema["paths"][path][method] = merged


def _security(app: FastAPI, schema: dict[str, Any]) -> None:
    """Replace the ``Authorization`` header parameters by the ``bearer`` scheme, required
    where the server requires a token."""
    settings = app.state.server.settings
    if settings.token is not None or settings.read_token is not None:
        schema.setdefault("components", {})["securitySchemes"] = copy.deepcopy(BEARER)
    for context in iter_route_contexts(app.routes):
        route = context.original_route
        if not isinstance(route, ServerRoute) or not route.include_in_schema:
            continue
        item = schema["paths"].get(route.path_format, {})
        for method in (route.methods or set()) - {"HEAD"}:
            operation = item.get(method.lower())
            if operation is None:
                continue
            params = [
                p
                for p in operation.get("parameters", [])
                if not (p["in"] == "header" and p["name"].lower() == "authorization")
            ]
            if params:
                operation["parameters"] = params
            else:
                operation.pop("parameters", None)
            need = route.needs()
            guarded = {"write": settings.token, "read": settings.read_token}.get(need or "")
            if guarded is not None:
                operation["security"] = [{"bearer": []}]
            elif operation.get("operationId") in SAVING and settings.token is not None:
                operation["security"] = [{}, {"bearer": []}]


def _json_errors(schema: dict[str, Any]) -> None:
    """Every error answer is JSON (FastAPI documents a route's error models under the route's
    own media type, e.g. text/plain for ``/metrics``)."""
    for item in schema["paths"].values():
        for operation in item.values():
            for status, response in operation.get("responses", {}).items():
                content = response.get("content", {})
                if status[:1] in "45" and content and "application/json" not in content:
                    response["content"] = {"application/json": next(iter(content.values()))}


def _image_encoding(operation: dict[str, Any], components: dict[str, Any]) -> None:
    """Declare the image media types of a multipart body's binary (file) parts."""
    form = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data")
    if form is None:
        return
    ref = form["schema"].get("$ref", "")
    body = components.get(ref.rsplit("/", 1)[-1], form["schema"])
    files = [
        name for name, prop in body.get("properties", {}).items() if prop.get("format") == "binary"
    ]
    if files:
        form["encoding"] = {name: {"contentType": ", ".join(IMAGE_TYPES)} for name in files}
