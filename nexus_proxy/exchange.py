"""The state of one forwarded request: its body stream, its outcome, and the client's presence."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx

from .types import Receive

__all__ = [
    "EMPTY_QUERY_SCOPE_KEY",
    "EXCHANGE_SCOPE_KEY",
    "NO_BODY",
    "BodyTimeout",
    "BodyTooLarge",
    "ClientDisconnect",
    "Exchange",
    "RequestBody",
]


# The ASGI scope key under which the forwarder leaves the exchange for the protocol.
EXCHANGE_SCOPE_KEY = "nexus_proxy.exchange"
# Set by the protocol when the target ends its path with "?" and an empty query.
EMPTY_QUERY_SCOPE_KEY = "nexus_proxy.empty_query"


class ClientDisconnect(Exception):
    """The client closed its connection before the exchange finished."""


class BodyTooLarge(Exception):
    """A chunked request body grew past max_body_size while being forwarded."""


class BodyTimeout(Exception):
    """The client paused its request body for longer than client_body_timeout."""


class Exchange:
    """One request from arrival to its last response byte, with what the logs and metrics need."""

    __slots__ = (
        "body_complete",
        "body_error",
        "bytes_in",
        "bytes_out",
        "client_gone",
        "error_code",
        "finished",
        "method",
        "path",
        "receive",
        "request_id",
        "response_started",
        "started",
        "status",
        "task",
        "upstream_seconds",
        "upstream_started",
    )

    def __init__(self, receive: Receive, method: str, path: str, request_id: str) -> None:
        self.receive = receive
        self.method = method
        self.path = path
        self.request_id = request_id
        self.started = time.perf_counter()
        self.task = asyncio.current_task()
        self.finished = False
        self.client_gone = False
        self.response_started = False
        self.status = 0
        self.error_code: str | None = None
        self.body_complete = False
        # Why reading the client's body stopped; the transport may report it as
        # its own failure, so the forwarder checks this first.
        self.body_error: Exception | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.upstream_seconds: float | None = None
        self.upstream_started = False

    def client_lost(self) -> None:
        """Cancel the exchange: the server saw the client's connection close."""
        self.client_gone = True
        if not self.finished and self.task is not None:
            self.task.cancel()

    def finish(self) -> None:
        """Mark the response complete; a later disconnect no longer cancels anything."""
        self.finished = True


class RequestBody(httpx.AsyncByteStream):
    """The client's body, read from ASGI `receive` whenever the upstream write needs more."""

    def __init__(self, exchange: Exchange, max_size: int, timeout: float) -> None:
        self.exchange = exchange
        self.max_size = max_size
        self.timeout = timeout

    async def __aiter__(self) -> AsyncIterator[bytes]:
        exchange = self.exchange
        more_body = True
        while more_body:
            try:
                async with asyncio.timeout(self.timeout):
                    message = await exchange.receive()
            except TimeoutError:
                exchange.body_error = BodyTimeout()
                raise exchange.body_error from None
            if message["type"] == "http.disconnect":
                exchange.client_gone = True
                exchange.body_error = ClientDisconnect()
                raise exchange.body_error
            more_body = message.get("more_body", False)
            body = message.get("body", b"")
            if body:
                exchange.bytes_in += len(body)
                if self.max_size and exchange.bytes_in > self.max_size:
                    # Raising here makes the transport drop the connection mid-body,
                    # so the upstream never receives a complete request.
                    exchange.body_error = BodyTooLarge()
                    raise exchange.body_error
                yield body
        exchange.body_complete = True


class _NoBody(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        return
        yield  # pragma: no cover


NO_BODY = _NoBody()
