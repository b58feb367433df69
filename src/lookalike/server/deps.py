"""FastAPI dependencies: how a route gets the catalog, the settings, the write-token check
and an upload's bytes.

Every dependency reads :class:`~lookalike.server.state.ServerState` from ``app.state``; the
``*Dep`` aliases are what route signatures use (``cat: CatalogDep``). They are ``async`` so
FastAPI runs them inline rather than in the thread pool.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request, UploadFile

from ..catalog import Catalog
from .state import ServerState, Settings


async def get_state(request: Request) -> ServerState:
    """The server's state (``app.state.server``)."""
    state: ServerState = request.app.state.server
    return state


StateDep = Annotated[ServerState, Depends(get_state)]


async def get_catalog(state: StateDep) -> Catalog:
    """The catalog the server answers from."""
    return state.catalog


async def get_settings(state: StateDep) -> Settings:
    """The server's settings (token, upload limit)."""
    return state.settings


CatalogDep = Annotated[Catalog, Depends(get_catalog)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


async def require_token(
    settings: SettingsDep, authorization: Annotated[str | None, Header()] = None
) -> None:
    """Refuse (401) a write without ``Authorization: Bearer <token>`` when the server has a
    token; compared in constant time."""
    if settings.token is None:
        return
    expected = f"Bearer {settings.token}".encode()
    if not authorization or not hmac.compare_digest(authorization.encode(), expected):
        raise HTTPException(401, "missing or wrong bearer token (Authorization: Bearer ...)")


#: Dependencies of every write endpoint.
WRITE = [Depends(require_token)]


async def read_upload(upload: UploadFile, settings: Settings) -> bytes:
    """An uploaded file's bytes: 413 over ``settings.max_upload``, 400 when empty.

    Reads at most ``max_upload + 1`` bytes of the (already spooled) file; the body limit of
    :class:`~lookalike.server.routing.BodyLimit` stopped anything far larger while it streamed.
    """
    data = await upload.read(settings.max_upload + 1)
    if len(data) > settings.max_upload:
        raise HTTPException(413, f"upload is over the {settings.max_upload}-byte limit")
    if not data:
        raise HTTPException(400, "the uploaded file is empty")
    return data
