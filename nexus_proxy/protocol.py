"""uvicorn's httptools protocol, with the checks a proxy in front of a money API needs.

- A target that is not in origin form (`GET http://host/x`, `CONNECT host:443`,
  `OPTIONS *`) reaches the app unparsed in `raw_path`, so the app can refuse it;
  uvicorn would otherwise reduce an absolute-form target to its path.
- The request line and headers are bounded in size and count (431), and must
  arrive within `client_header_timeout` (408): uvicorn bounds neither.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from . import errors, observe
from .exchange import EMPTY_QUERY_SCOPE_KEY, EXCHANGE_SCOPE_KEY, Exchange

__all__ = ["LIMITS_STATE_KEY", "ClientLimits", "OriginFormHttpTools"]

logger = logging.getLogger("nexus_proxy")

# The lifespan state key for the limits; uvicorn hands that state to each connection.
LIMITS_STATE_KEY = "nexus_proxy.client_limits"


@dataclass(frozen=True)
class ClientLimits:
    """How much and how slowly a client may send a request head."""

    max_header_size: int = 64 * 1024
    max_header_count: int = 100
    header_timeout: float = 30.0


# Bytes held by CorkedTransport before it writes at once.
CORK_LIMIT = 64 * 1024


class _HeadTooLarge(Exception):
    pass


class CorkedTransport:
    """A transport whose writes within one event-loop step leave as one write.

    uvicorn writes a response head and then its body with a system call each. Joined,
    a small response costs one send instead of two. Data is held until the loop's
    next step at most, or until `CORK_LIMIT` bytes are waiting.
    """

    __slots__ = ("loop", "pending", "size", "transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self.loop = loop
        self.pending: list[bytes] = []
        self.size = 0

    def write(self, data: bytes) -> None:
        if not self.pending:
            self.loop.call_soon(self.flush)
        self.pending.append(data)
        self.size += len(data)
        if self.size >= CORK_LIMIT:
            self.flush()

    def flush(self) -> None:
        """Write what is held now."""
        if self.pending:
            pending = self.pending
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            self.pending = []
            self.size = 0
            self.transport.write(data)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def abort(self) -> None:
        self.pending = []
        self.transport.abort()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.transport.resume_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.transport.set_protocol(protocol)

    def get_write_buffer_size(self) -> int:
        return self.size + self.transport.get_write_buffer_size()


class OriginFormHttpTools(HttpToolsProtocol):
    """The httptools protocol with origin-form checks and bounded request heads."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits: ClientLimits = self.app_state.get(LIMITS_STATE_KEY) or ClientLimits()
        self.head_size = 0
        self.head_count = 0
        self.head_too_large = False
        # One timer per connection, moved on lazily: arming and cancelling one per
        # request would cost more than the checks it makes.
        self.head_timer: asyncio.TimerHandle | None = None
        # When the request head now arriving began, or None between heads.
        self.head_started: float | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Flow control keeps the real transport; everything else writes through the cork.
        self.transport = CorkedTransport(transport, self.loop)  # type: ignore[assignment]
        self.head_started = self.loop.time()
        self._start_head_timer(self.limits.header_timeout)

    def on_response_complete(self) -> None:
        if observe.in_flight() <= 1:
            # The only request in flight: its response leaves now, which saves the
            # wait for the loop's next step. Under load, writes are left to batch.
            cast(CorkedTransport, self.transport).flush()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # The request in flight stops at once: its upstream exchange is
            # cancelled and the pooled connection released.
            exchange: Exchange | None = cycle.scope.get(EXCHANGE_SCOPE_KEY)  # type: ignore[assignment]
            if exchange is not None:
                exchange.client_lost()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.head_size = 0
        self.head_count = 0
        if self.head_started is None:
            self.head_started = self.loop.time()
        if self.head_timer is None:
            self._start_head_timer(self.limits.header_timeout)

    def on_url(self, url: bytes) -> None:
        self._count(len(url), 0)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4, 1)
        # Fields after the head (head_started is None then) are a chunked body's
        # trailer fields. uvicorn would add them to the request's headers.
        if self.head_started is not None:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self.head_started = None
        target = self.url
        if not target.startswith(b"/"):
            self.url = b"/"
        super().on_headers_complete()
        if not target.startswith(b"/"):
            self.scope["raw_path"] = target
        elif b"?" in target and not self.scope["query_string"]:
            # ASGI cannot tell "/a?" from "/a", but the upstream must get what was sent.
            cast(dict[str, Any], self.scope)[EMPTY_QUERY_SCOPE_KEY] = True

    def send_400_response(self, msg: str) -> None:
        if self.head_too_large:
            logger.warning("rejected a request whose head exceeds max_header_size or 100 fields")
            error = errors.HEADERS_TOO_LARGE
        else:
            logger.warning("rejected a request that is not valid HTTP/1.1")
            error = errors.MALFORMED_REQUEST
        self._close_with(error)

    def _close_with(self, error: errors.ProxyError) -> None:
        """Send `error` and close, but never ahead of an earlier request's response."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if not cycle.more_body:
                # The error belongs to a pipelined request behind one still in flight:
                # writing now would hand it to the client as that request's response.
                # Close once that request has its response.
                cycle.keep_alive = False
                self.flow.pause_reading()
                return
            if cycle.response_started:
                # The current request's body broke after its response began.
                self.transport.close()
                return
        # The current request's body broke before its response began, or no
        # request is in flight, so the error is the response. Closing tells the app.
        exchange = self._exchange()
        if exchange is None:
            observe.rejected(error.code)
        else:
            if exchange.upstream_started and error is errors.MALFORMED_REQUEST:
                # The upstream has the head and part of the body, cut off by the close.
                error = errors.MALFORMED_BODY_SENT
            exchange.status = error.status
            exchange.error_code = error.code
            exchange.response_started = True
        self.transport.write(errors.raw_response(error))
        self.transport.close()

    def _exchange(self) -> Exchange | None:
        """Return the forwarded exchange whose response has not started, if any."""
        cycle = self.cycle
        if cycle is None or cycle.response_complete or cycle.response_started:
            return None
        return cycle.scope.get(EXCHANGE_SCOPE_KEY)  # type: ignore[return-value]

    def _count(self, size: int, fields: int) -> None:
        self.head_size += size
        self.head_count += fields
        if self.head_size > self.limits.max_header_size or (
            self.head_count > self.limits.max_header_count
        ):
            # Raising inside a parser callback makes httptools stop with a parse
            # error, which lands in send_400_response above.
            self.head_too_large = True
            raise _HeadTooLarge

    def _start_head_timer(self, delay: float) -> None:
        self.head_timer = self.loop.call_later(delay, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.transport.is_closing() or self.head_started is None:
            # No head is arriving; the next one to begin arms the timer again.
            return
        timeout = self.limits.header_timeout
        if self.cycle is not None and not self.cycle.response_complete:
            # The clock runs for the next head only once the current response is complete.
            self.head_started = self.loop.time()
            self._start_head_timer(timeout)
            return
        remaining = self.head_started + timeout - self.loop.time()
        if remaining > 0:
            self._start_head_timer(remaining)
            return
        logger.warning(
            "closed a connection from %s: no complete request head within %s s",
            self.client,
            self.limits.header_timeout,
        )
        self._close_with(errors.HEADER_TIMEOUT)
