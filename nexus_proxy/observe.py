"""What happens when a forwarded request ends: its metrics and its access log line."""

from __future__ import annotations

import logging
import time

from prometheus_client import Counter

from . import metrics
from .exchange import Exchange

__all__ = ["record"]

access_logger = logging.getLogger("nexus_proxy.access")


# The request counter for each (method, status) seen: `labels()` takes a lock and
# builds its key on every call, which the hot path need not pay.
_counters: dict[tuple[str, int], Counter] = {}


def record(exchange: Exchange, *, access_log: bool) -> None:
    """Count the finished exchange and, when enabled, write its access line."""
    duration = time.perf_counter() - exchange.started
    status = exchange.status
    counter = _counters.get((exchange.method, status))
    if counter is None:
        method = metrics.method_label(exchange.method)
        counter = _counters[(exchange.method, status)] = metrics.REQUESTS.labels(
            method, str(status)
        )
    counter.inc()
    metrics.REQUEST_DURATION.observe(duration)
    if exchange.upstream_seconds is not None:
        metrics.UPSTREAM_DURATION.observe(exchange.upstream_seconds)
    if exchange.error_code is not None:
        metrics.ERRORS.labels(exchange.error_code).inc()
    if exchange.bytes_in:
        metrics.BYTES_IN.inc(exchange.bytes_in)
    if exchange.bytes_out:
        metrics.BYTES_OUT.inc(exchange.bytes_out)

    if access_log and access_logger.isEnabledFor(logging.INFO):
        _log(exchange, duration)


def _log(exchange: Exchange, duration: float) -> None:
    upstream_ms = (
        round(exchange.upstream_seconds * 1000, 1)
        if exchange.upstream_seconds is not None
        else None
    )
    fields = {
        "request_id": exchange.request_id,
        "method": exchange.method,
        "path": exchange.path,
        "status": exchange.status,
        "duration_ms": round(duration * 1000, 1),
        "upstream_ms": upstream_ms,
        "bytes_in": exchange.bytes_in,
        "bytes_out": exchange.bytes_out,
        "error": exchange.error_code,
        "client_gone": exchange.client_gone,
    }
    access_logger.info(
        "%s %s %s %.1fms upstream=%sms in=%d out=%d%s",
        exchange.method,
        exchange.path,
        exchange.status or "-",
        fields["duration_ms"],
        "-" if upstream_ms is None else upstream_ms,
        exchange.bytes_in,
        exchange.bytes_out,
        f" error={exchange.error_code}" if exchange.error_code else "",
        extra=fields,
    )
