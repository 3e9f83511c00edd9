"""The forwarding path: one ASGI callable that relays a request to the upstream and back.

Contract:
- The upstream target is the base path plus the client's raw path and raw query,
  byte for byte, so nothing is decoded, re-encoded or normalised.
- Bodies stream both ways; neither is held in memory.
- Nothing is retried. The transport's connection pool only reconnects before any
  byte of the request has been written.
- When the client goes away, the upstream exchange is cancelled and its connection
  released.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import httpx

from . import errors
from .credentials import Credential, CredentialUnavailable
from .headers import Framing, RequestPolicy, ResponsePolicy
from .types import Receive, Scope, Send

__all__ = ["Forwarder"]

logger = logging.getLogger("nexus_proxy")

# Which error the client gets for each transport failure before the response started.
# ConnectError covers DNS and TLS handshake failures; none of these sent a byte.
_FAILURES: tuple[tuple[type[httpx.TransportError], errors.ProxyError], ...] = (
    (httpx.ConnectError, errors.UPSTREAM_UNREACHABLE),
    (httpx.ConnectTimeout, errors.UPSTREAM_UNREACHABLE),
    (httpx.ProxyError, errors.UPSTREAM_UNREACHABLE),
    (httpx.PoolTimeout, errors.UPSTREAM_BUSY),
    (httpx.TimeoutException, errors.UPSTREAM_TIMEOUT),
)

_NO_BODY_STATUSES = frozenset({204, 304})
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class ClientDisconnect(Exception):
    """The client closed its connection before the exchange finished."""


class _RawTarget(httpx.URL):
    """An upstream URL whose request target is sent exactly as given.

    httpx.URL normalises dot segments and percent-encodes some characters; the
    Nexus contract is that path and query pass byte for byte.
    """

    def __init__(self, origin: httpx.URL, target: bytes) -> None:
        super().__init__(origin)
        self._target = target

    @property
    def raw_path(self) -> bytes:
        return self._target


class _Exchange:
    """What one request needs to notice a client that went away."""

    def __init__(self, receive: Receive) -> None:
        self.receive = receive
        self.task = asyncio.current_task()
        self.watcher: asyncio.Task[None] | None = None
        self.finished = False
        self.client_gone = False

    def watch_disconnect(self) -> None:
        """Cancel the exchange when the client disconnects; starts once the body is read."""
        self.watcher = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        # A request without a body still delivers one empty http.request message.
        while (await self.receive())["type"] != "http.disconnect":
            pass
        if not self.finished and self.task is not None:
            self.client_gone = True
            self.task.cancel()

    def finish(self) -> None:
        """Stop watching; called as soon as the last response byte was handed to the server."""
        self.finished = True
        if self.watcher is not None:
            self.watcher.cancel()


class _RequestBody(httpx.AsyncByteStream):
    """The client's body, read from ASGI `receive` as the upstream write asks for it."""

    def __init__(self, exchange: _Exchange) -> None:
        self.exchange = exchange

    async def __aiter__(self) -> AsyncIterator[bytes]:
        more_body = True
        while more_body:
            message = await self.exchange.receive()
            if message["type"] == "http.disconnect":
                self.exchange.client_gone = True
                raise ClientDisconnect
            more_body = message.get("more_body", False)
            body = message.get("body", b"")
            if body:
                yield body
        self.exchange.watch_disconnect()


class _NoBody(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        return
        yield  # pragma: no cover


class Forwarder:
    """Relays every request it gets to `upstream` with the credential added."""

    def __init__(
        self,
        upstream: str,
        credential: Credential,
        transport: httpx.AsyncBaseTransport,
        *,
        iso8601: bool,
        default_headers: dict[str, str],
        timeout: httpx.Timeout,
    ) -> None:
        url = httpx.URL(upstream)
        self.origin = url.copy_with(raw_path=b"/")
        self.base_path = url.raw_path.rstrip(b"/")
        self.credential = credential
        self.transport = transport
        self.requests = RequestPolicy(
            url.netloc.decode("ascii"), iso8601=iso8601, defaults=default_headers
        )
        self.responses = ResponsePolicy(url)
        self.extensions = {"timeout": timeout.as_dict()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        if scope["method"] == "CONNECT" or not raw_path.startswith(b"/"):
            await errors.send_error(send, errors.BAD_REQUEST)
            return

        exchange = _Exchange(receive)
        try:
            await self._forward(scope, raw_path, exchange, send)
        except asyncio.CancelledError:
            if not exchange.client_gone:
                raise
            if exchange.task is not None:
                exchange.task.uncancel()
            logger.info("client disconnected before the response was complete")
        except ClientDisconnect:
            logger.info("client disconnected while sending the request body")
        finally:
            exchange.finish()

    async def _forward(
        self, scope: Scope, raw_path: bytes, exchange: _Exchange, send: Send
    ) -> None:
        try:
            authorization = await self.credential.authorization()
        except CredentialUnavailable as exc:
            logger.warning("no credential to send: %s; answering 503", exc)
            await errors.send_error(send, errors.CREDENTIAL_UNAVAILABLE)
            return

        request, framing = self._build_request(scope, raw_path, exchange, authorization)
        response = await self._send(request, exchange, send)
        if response is None:
            return

        if response.status_code == 401 and await self._may_repeat(scope, framing, authorization):
            await response.aclose()
            authorization = await self.credential.authorization()
            request, _ = self._build_request(scope, raw_path, exchange, authorization)
            response = await self._send(request, exchange, send)
            if response is None:
                return

        try:
            await self._relay(scope, response, send, exchange)
        finally:
            await response.aclose()

    async def _send(
        self, request: httpx.Request, exchange: _Exchange, send: Send
    ) -> httpx.Response | None:
        """The upstream's response, or None after answering the client with an error."""
        try:
            return await self.transport.handle_async_request(request)
        except httpx.TransportError as exc:
            if exchange.client_gone:
                raise ClientDisconnect from exc
            await self._fail(send, exc)
            return None

    async def _may_repeat(self, scope: Scope, framing: Framing, authorization: bytes) -> bool:
        """After a 401: whether to send the request again with a new credential.

        Only requests that are safe to repeat (RFC 9110 section 9.2.1) and had no
        body qualify; the credential decides whether a new one exists.
        """
        fresh = await self.credential.rejected(authorization)
        return fresh and scope["method"] in _SAFE_METHODS and not framing.has_body

    def _build_request(
        self, scope: Scope, raw_path: bytes, exchange: _Exchange, authorization: bytes
    ) -> tuple[httpx.Request, Framing]:
        headers, framing = self.requests.apply(scope["headers"], authorization)
        target = self.base_path + raw_path
        if scope["query_string"]:
            target += b"?" + scope["query_string"]

        stream: httpx.AsyncByteStream
        if framing.has_body:
            stream = _RequestBody(exchange)
        else:
            stream = _NoBody()
            exchange.watch_disconnect()
        request = httpx.Request(
            scope["method"], self.origin, headers=headers, stream=stream, extensions=self.extensions
        )
        request.url = _RawTarget(self.origin, target)
        return request, framing

    async def _relay(
        self, scope: Scope, response: httpx.Response, send: Send, exchange: _Exchange
    ) -> None:
        headers = self.responses.apply(response.headers.raw)
        if response.status_code in _NO_BODY_STATUSES:
            # 204 and 304 never carry a body (RFC 9110 sections 15.3.5, 15.4.5); a
            # Content-Length on them would make the server wait for body bytes.
            headers = [
                (name, value) for name, value in headers if name.lower() != b"content-length"
            ]
        await send(
            {"type": "http.response.start", "status": response.status_code, "headers": headers}
        )
        if scope["method"] == "HEAD" or response.status_code in _NO_BODY_STATUSES:
            exchange.finish()
            await send({"type": "http.response.body", "body": b""})
            return

        # Hold one chunk back so that the last one goes out with more_body=False,
        # saving a send per response.
        pending = b""
        assert isinstance(response.stream, httpx.AsyncByteStream)
        try:
            async for chunk in response.stream:
                if pending:
                    await send({"type": "http.response.body", "body": pending, "more_body": True})
                pending = chunk
        except httpx.TransportError as exc:
            # The status line is out: the only honest signal left is an aborted
            # connection, never a clean end of a truncated body.
            logger.warning(
                "upstream failed mid-response (%s); aborting the client connection",
                exc.__class__.__name__,
            )
            return
        exchange.finish()
        await send({"type": "http.response.body", "body": pending})

    async def _fail(self, send: Send, exc: httpx.TransportError) -> None:
        error = errors.UPSTREAM_PROTOCOL_ERROR
        for kind, mapped in _FAILURES:
            if isinstance(exc, kind):
                error = mapped
                break
        logger.warning(
            "upstream request failed: %s (%s); answering %d %s",
            exc.__class__.__name__,
            exc,
            error.status,
            error.code,
        )
        await errors.send_error(send, error)
