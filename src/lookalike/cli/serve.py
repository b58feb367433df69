"""The ``serve`` command: the HTTP API (FastAPI + uvicorn) and the web page over one catalog.

Registered on :data:`commands` (merged into the top level).
"""

from __future__ import annotations

from typing import Annotated

import typer

from .common import CatalogOpt, EngineOpt, command, opened, warn

commands = typer.Typer()


@command(commands)
def serve(
    catalog: CatalogOpt,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="LOOKALIKE_TOKEN",
            help="Bearer token required by POST /images, DELETE /images, PUT /listings.",
        ),
    ] = None,
    max_upload: Annotated[
        int | None,
        typer.Option(
            help="Largest upload, bytes (default 16 MiB, the server's DEFAULT_MAX_UPLOAD; "
            "413 above)."
        ),
    ] = None,
    engine: EngineOpt = None,
) -> None:
    """Serve the HTTP API (OpenAPI at /docs) and the web page at / (search by upload, results
    grouped by listing, an Explore map of the collection)."""
    import uvicorn

    from ..server import create_app

    with opened(catalog, create=True, engine=engine) as cat:
        limits = {} if max_upload is None else {"max_upload": max_upload}
        app = create_app(cat, token=token, **limits)
        warn(
            f"lookalike: serving {catalog} on http://{host}:{port}/"
            + (" (writes need the bearer token)" if token else "")
        )
        uvicorn.run(app, host=host, port=port, log_level="warning")
