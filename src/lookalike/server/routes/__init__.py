"""The API's routers, one module per concern: ``search`` (``POST /search``), ``images``
(add, read, delete images and thumbnails), ``listings`` (live attributes), ``facts`` (stats,
health, metrics, the map, the vocabularies). :func:`~lookalike.server.app.create_app`
includes them in this order."""

from . import facts, images, listings, search

ROUTERS = (search.router, images.router, listings.router, facts.router)

__all__ = ["ROUTERS"]
