"""The record of each forwarded request: its metrics and its access line.

Counters and the in-flight gauge are tallied in plain Python and written to
prometheus-client by `flush()`: at least once a second while the app runs, and
before this process renders `/_proxy/metrics`. With several workers every update
writes a memory-mapped file, which costs more than the rest of a small request's
bookkeeping. So another worker's counts may lag by up to a second. Histograms are
observed at once, because prometheus-client offers no batched observe.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from . import metrics
from .exchange import Exchange

__all__ = ["FLUSH_INTERVAL", "flush", "flushing", "in_flight", "record", "rejected", "started"]

access_logger = logging.getLogger("nexus_proxy.access")

# Seconds between two writes of the tallies to prometheus-client.
FLUSH_INTERVAL = 1.0


class _Tally:
    """Counts not yet written to prometheus-client."""

    def __init__(self) -> None:
        self.in_flight = 0
        # Keyed by the method's label, never the raw method, so clients cannot grow it.
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.bytes_in = 0
        self.bytes_out = 0


_tally = _Tally()


def in_flight() -> int:
    """Return how many forwarded requests this process is handling now."""
    return _tally.in_flight


def rejected(code: str) -> None:
    """Count an error the server protocol sent before any request reached the app."""
    _tally.errors[code] += 1


def started() -> None:
    """Count a forwarded request as in flight."""
    _tally.in_flight += 1


def record(exchange: Exchange, *, access_log: bool) -> None:
    """Count the finished exchange and, when enabled, write its access line."""
    duration = time.perf_counter() - exchange.started
    tally = _tally
    tally.in_flight -= 1
    tally.requests[(metrics.method_label(exchange.method), exchange.status)] += 1
    if exchange.error_code is not None:
        tally.errors[exchange.error_code] += 1
    tally.bytes_in += exchange.bytes_in
    tally.bytes_out += exchange.bytes_out
    metrics.REQUEST_DURATION.observe(duration)
    if exchange.upstream_seconds is not None:
        metrics.UPSTREAM_DURATION.observe(exchange.upstream_seconds)

    if access_log and access_logger.isEnabledFor(logging.INFO):
        _log(exchange, duration)


def flush() -> None:
    """Write the tallies to prometheus-client and start new ones."""
    tally = _tally
    for (method, status), count in tally.requests.items():
        metrics.REQUESTS.labels(method, str(status)).inc(count)
    for code, count in tally.errors.items():
        metrics.ERRORS.labels(code).inc(count)
    if tally.bytes_in:
        metrics.BYTES_IN.inc(tally.bytes_in)
    if tally.bytes_out:
        metrics.BYTES_OUT.inc(tally.bytes_out)
    metrics.IN_FLIGHT.set(tally.in_flight)
    tally.requests.clear()
    tally.errors.clear()
    tally.bytes_in = tally.bytes_out = 0


@contextlib.asynccontextmanager
async def flushing(interval: float = FLUSH_INTERVAL) -> AsyncIterator[None]:
    """Flush every `interval` seconds while the context is open, and once at its end."""

    async def every_interval() -> None:
        while True:
            await asyncio.sleep(interval)
            flush()

    task = asyncio.create_task(every_interval())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        flush()


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
