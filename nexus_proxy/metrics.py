"""Prometheus metrics, kept with prometheus-client.

With several workers, prometheus-client's multiprocess mode is used: the command
line sets PROMETHEUS_MULTIPROC_DIR before this module is first imported, and
`/_proxy/metrics` then adds up the files every worker writes.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

__all__ = [
    "API_KEY_EXPIRY",
    "BYTES_IN",
    "BYTES_OUT",
    "CONTENT_TYPE_LATEST",
    "CREDENTIAL_REFRESHES",
    "CREDENTIAL_RELOADS",
    "ERRORS",
    "IN_FLIGHT",
    "REQUESTS",
    "REQUEST_DURATION",
    "UPSTREAM_DURATION",
    "UPSTREAM_UNAUTHORIZED",
    "exposition",
    "method_label",
]

# Seconds, from a fast loopback response up to the default read timeout.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

REQUESTS = Counter(
    "nexus_proxy_requests", "Requests completed, by method and status code", ["method", "status"]
)
REQUEST_DURATION = Histogram(
    "nexus_proxy_request_duration_seconds",
    "Time from the request's arrival to the last response byte",
    buckets=_BUCKETS,
)
UPSTREAM_DURATION = Histogram(
    "nexus_proxy_upstream_duration_seconds",
    "Time from sending upstream to the upstream's response headers",
    buckets=_BUCKETS,
)
ERRORS = Counter("nexus_proxy_errors", "Errors the proxy sent itself, by code", ["code"])
IN_FLIGHT = Gauge(
    "nexus_proxy_in_flight_requests", "Requests being forwarded now", multiprocess_mode="livesum"
)
BYTES_IN = Counter("nexus_proxy_request_bytes", "Request body bytes received from clients")
BYTES_OUT = Counter("nexus_proxy_response_bytes", "Response body bytes sent to clients")
UPSTREAM_UNAUTHORIZED = Counter(
    "nexus_proxy_upstream_unauthorized", "Upstream 401 responses to the proxy's credential"
)
CREDENTIAL_RELOADS = Counter(
    "nexus_proxy_credential_reloads", "Times a changed API key file was loaded"
)
CREDENTIAL_REFRESHES = Counter(
    "nexus_proxy_credential_refreshes", "OAuth access tokens obtained", ["outcome"]
)
API_KEY_EXPIRY = Gauge(
    "nexus_proxy_api_key_expiry_seconds",
    "Seconds until api_key_expires (negative once expired)",
    multiprocess_mode="max",
)

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def method_label(method: str) -> str:
    """Return the method as a label value; any other method counts as OTHER, to bound the series."""
    return method if method in _METHODS else "OTHER"


def exposition() -> bytes:
    """Render the metrics in the Prometheus text format, summed over all workers."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest()
