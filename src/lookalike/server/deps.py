"""FastAPI dependencies: how a route gets the catalog, the settings, the token checks
(write, read) and an upload's bytes.

Who may do what: a request's *access* is ``"write"`` when it bears the write token,
``"read"`` when it bears the read token, else None. Writes need ``"write"`` when the server
has a write token; reads need either token when the server has a read token. Only a request
with a token sees server paths (an image's full ``source``, the catalog's location). The
route class (:class:`~lookalike.server.routing.ServerRoute`) runs the same check *before*
reading a request's body, so a refused upload costs its headers only.

Every dependency reads :class:`~lookalike.server.state.ServerState` from ``app.state``; the
``*Dep`` aliases are what route signatures use (``cat: CatalogDep``). They are ``async`` so
FastAPI runs them inline rather than in the thread pool.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Literal

from fastapi import Depends, Header, HTTPException, Request, UploadFile

from ..catalog import Catalog
from ..images import probe_image
from .state import ServerState, Settings

Access = Literal["write", "read"] | None
#: Headers of an answer given before the request's body was read: the connection closes.
CLOSE = {"Connection": "close"}


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


def _bears(authorization: str | None, token: str | None) -> bool:
    if token is None or not authorization:
        return False
    expected = f"Bearer {token}".encode()
    return hmac.compare_digest(authorization.encode("utf-8", "replace"), expected)


def access_of(settings: Settings, authorization: str | None) -> Access:
    """The access ``Authorization`` grants (tokens compared in constant time)."""
    if _bears(authorization, settings.token):
        return "write"
    if _bears(authorization, settings.read_token):
        return "read"
    return None


def check_access(settings: Settings, authorization: str | None, need: Access) -> Access:
    """The request's access; 401 when it lacks what ``need`` asks for (``"write"``: the write
    token when the server has one; ``"read"``: either token when the server has a read
    token)."""
    access = access_of(settings, authorization)
    if need == "write" and settings.token is not None and access != "write":
        raise HTTPException(
            401, "missing or wrong bearer token (Authorization: Bearer ...)", headers=CLOSE
        )
    if need == "read" and settings.read_token is not None and access is None:
        raise HTTPException(
            401,
            "this server's reads need a bearer token (Authorization: Bearer ...)",
            headers=CLOSE,
        )
    return access


async def require_token(
    settings: SettingsDep, authorization: Annotated[str | None, Header()] = None
) -> None:
    """Refuse (401) a write without ``Authorization: Bearer <token>`` when the server has a
    token."""
    check_access(settings, authorization, "write")


async def require_read(
    settings: SettingsDep, authorization: Annotated[str | None, Header()] = None
) -> Access:
    """Refuse (401) a read without a token when the server has a read token; the access."""
    return check_access(settings, authorization, "read")


#: Dependencies of every write endpoint.
WRITE = [Depends(require_token)]
#: Dependencies of every read endpoint.
READ = [Depends(require_read)]
#: A route parameter: the request's access (after the read check).
AccessDep = Annotated[Access, Depends(require_read)]


async def read_upload(upload: UploadFile, settings: Settings) -> bytes:
    """An uploaded image's bytes: 413 over ``settings.max_upload``, 400 when empty, 415 when
    its header says more than ``settings.max_pixels`` pixels (or it is no image).

    Reads at most ``max_upload + 1`` bytes of the (already spooled) file; the body limit of
    :class:`~lookalike.server.routing.BodyLimit` stopped anything far larger while it streamed.
    """
    data = await upload.read(settings.max_upload + 1)
    if len(data) > settings.max_upload:
        raise HTTPException(413, f"upload is over the {settings.max_upload}-byte limit")
    if not data:
        raise HTTPException(400, "the uploaded file is empty")
    probe_image(data, f"upload {upload.filename or ''}".strip(), settings.max_pixels)
    return data
