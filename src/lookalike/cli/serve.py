"""The ``serve`` command: the HTTP API (FastAPI + uvicorn) and the web page over one catalog.

Registered on :data:`commands` (merged into the top level).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from typing import Annotated

import typer

from .common import CatalogOpt, EngineOpt, command, fail, opened, parse_age, warn

commands = typer.Typer()


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a port in use is one line, not a log.

    Made with ``IPPROTO_TCP`` named, and ``TCP_NODELAY`` set: asyncio turns Nagle's algorithm
    off only on connections whose socket says TCP (``proto``), and a socket made with proto 0
    lets every response that goes out in two writes wait for the client's delayed ACK (40 ms
    on Linux; at 1 client a 20 ms search took 68 ms).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = "in use" if exc.errno in (98, 48, 10048) else (exc.strerror or str(exc))
        fail(f"cannot listen on {host}:{port}: {reason}")
    sock.set_inheritable(True)
    return sock


@command(commands)
def serve(
    catalog: CatalogOpt,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="LOOKALIKE_TOKEN",
            help="Bearer token required by POST /images, DELETE /images, PUT /listings and "
            "POST /search with save=true (without one, writes are open: a warning is printed "
            "when --host is not a loopback address). It grants reads too.",
        ),
    ] = None,
    read_token: Annotated[
        str | None,
        typer.Option(
            envvar="LOOKALIKE_READ_TOKEN",
            help="Bearer token required by every read (search, images, thumbnails, listings, "
            "results, stats, map, metrics, options); the write token is accepted too. "
            "/healthz, the page's files, /docs and /openapi.json stay open. Without it reads "
            "are open, but only a request bearing a token sees server paths (an image's full "
            "source, the catalog's location).",
        ),
    ] = None,
    max_upload: Annotated[
        int | None,
        typer.Option(
            help="Largest upload, bytes (default 16 MiB, the server's DEFAULT_MAX_UPLOAD; "
            "413 above)."
        ),
    ] = None,
    max_pixels: Annotated[
        int | None,
        typer.Option(
            help="Largest uploaded image, pixels (default 40,000,000; 415 above, read from the "
            "image's header before decoding)."
        ),
    ] = None,
    max_decodes: Annotated[
        int | None,
        typer.Option(
            help="Uploads decoded and embedded at once; more wait their turn (default: the "
            "number of cores)."
        ),
    ] = None,
    results_ttl: Annotated[
        str,
        typer.Option(
            help="How long saved search results (save=true, search --save) are kept: 7d, 12h, "
            "30m, 90s, 2w or seconds; 0 keeps them forever. The server deletes older ones "
            "while it runs (at start, then every quarter of this age, at most every 10 min); "
            "`lookalike results --older-than AGE` does it by hand.",
        ),
    ] = "7d",
    create: Annotated[
        bool,
        typer.Option(help="Create the catalog when it does not exist (default: refuse)."),
    ] = False,
    access_log: Annotated[
        bool, typer.Option(help="Print one access-log line per request on stderr.")
    ] = True,
    engine: EngineOpt = None,
) -> None:
    """Serve the HTTP API (OpenAPI at /openapi.json, Swagger UI at /docs) and the web page at
    / (search by upload, results grouped by listing, an Explore map of the collection)."""
    import uvicorn

    from ..server import create_app

    ttl = parse_age(results_ttl, "--results-ttl")
    if not create and "://" not in catalog and not os.path.exists(catalog):
        fail(f"no catalog at {catalog} (give --create to start an empty one)")
    sock = _bind(host, port)
    with opened(catalog, create=create, engine=engine) as cat:
        limits = {
            name: value
            for name, value in (
                ("max_upload", max_upload),
                ("max_pixels", max_pixels),
                ("max_decodes", max_decodes),
            )
            if value is not None
        }
        app = create_app(cat, token=token, read_token=read_token, results_ttl=ttl, **limits)
        if token is None and not _loopback(host):
            warn(f"lookalike: warning: writes are open to anyone who reaches {host} (no --token)")
        warn(
            f"lookalike: serving {catalog} on http://{host}:{port}/"
            + (" (writes need the bearer token)" if token else "")
            + (" (reads need a bearer token)" if read_token else "")
            + (f" (saved results kept {results_ttl})" if ttl else " (saved results kept)")
        )
        config = uvicorn.Config(app, log_level="warning", access_log=access_log)
        if access_log:
            logging.getLogger("uvicorn.access").setLevel(logging.INFO)
        uvicorn.Server(config).run(sockets=[sock])
