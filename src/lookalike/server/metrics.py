"""Prometheus metrics of the HTTP server (prometheus_client, one registry per app), and the
middleware that counts every answered request by method, route and status."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from starlette.requests import Request
from starlette.responses import Response


class Metrics:
    """Request counts by method/route/status, latency histograms (seconds) by method/route,
    the catalog's image count, and the saved searches deleted as expired."""

    def __init__(self, catalog: Any) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lookalike_http_requests",
            "HTTP requests served.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "lookalike_http_request_seconds",
            "Time to answer a request, seconds.",
            ["method", "route"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
        )
        self.pruned = Counter(
            "lookalike_saved_results_pruned",
            "Saved search results deleted because they outlived --results-ttl.",
            registry=self.registry,
        )
        images = Gauge(
            "lookalike_catalog_images", "Images stored in the catalog.", registry=self.registry
        )
        images.set_function(lambda: float(catalog.count()))

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


async def count_requests(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    """HTTP middleware: observe each request in ``app.state.server.metrics`` under its route
    template (``/images/{image_id:path}``), or ``unmatched``."""
    t0 = time.perf_counter()
    response = await call_next(request)
    route = getattr(request.scope.get("route"), "path", "unmatched")
    metrics: Metrics = request.app.state.server.metrics
    metrics.observe(request.method, route, response.status_code, time.perf_counter() - t0)
    return response
