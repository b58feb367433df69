"""The API's routers, one module per concern: ``search`` (``POST /search``), ``images``
(add, read, delete images and thumbnails), ``listings`` (live attributes), ``facts`` (stats,
health, metrics, the map, the vocabularies), ``watch`` (watchlists), ``live`` (server-sent
events of arrivals and matches). :func:`~lookalike.server.app.create_app`
includes them in this order."""

from . import facts, images, listings, live, search, watch

ROUTERS = (search.router, images.router, listings.router, facts.router, watch.router, live.router)

__all__ = ["ROUTERS"]
