"""HTTP API and web page (FastAPI + uvicorn): see :mod:`lookalike.server.app`."""

from .app import create_app

__all__ = ["create_app"]
