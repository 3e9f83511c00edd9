"""The forwarding path: one ASGI callable that relays a request to the upstream and back.

Contract:
- The upstream target is the base path plus the client's raw path and raw query,
  byte for byte, so nothing is decoded, re-encoded or normalised.
- Bodies stream both ways; neither is held in memory.
- Nothing is retried once a byte may have been sent. The transport's connection
  pool only reconnects before any byte of the request has been written, and the
  one repeat after an upstream 401 is limited to safe requests without a body
  when the credential has changed.
- When the client goes away, the upstream exchange is cancelled and its connection
  released.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

import httpx

from . import errors, metrics
from .credentials import Credential, CredentialUnavailable, RepeatLimit, repeats_note
from .exchange import (
    EMPTY_QUERY_SCOPE_KEY,
    EXCHANGE_SCOPE_KEY,
    NO_BODY,
    BodyTimeout,
    BodyTooLarge,
    ClientDisconnect,
    Exchange,
    RequestBody,
)
from .gate import Gate
from .headers import Framing, RequestPolicy, ResponsePolicy
from .logs import REQUEST_ID
from .observe import record, started
from .types import Receive, Scope, Send

__all__ = ["Forwarder"]

logger = logging.getLogger("nexus_proxy")

# The error for each transport failure before the response started. ConnectError
# covers DNS and TLS handshake failures, and none of these five sent a byte.
_FAILURES: tuple[tuple[type[httpx.TransportError], errors.ProxyError], ...] = (
    (httpx.ConnectError, errors.UPSTREAM_UNREACHABLE),
    (httpx.ConnectTimeout, errors.UPSTREAM_UNREACHABLE),
    (httpx.ProxyError, errors.UPSTREAM_UNREACHABLE),
    (httpx.PoolTimeout, errors.UPSTREAM_BUSY),
    (httpx.TimeoutException, errors.UPSTREAM_TIMEOUT),
)

_NO_BODY_STATUSES = frozenset({204, 304})
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Any method but GET, HEAD and OPTIONS goes up with "Content-Length: 0" when it has
# no body (RFC 9110 section 8.6), so the upstream need not guess.
_EMPTY_LENGTH = (b"content-length", b"0")
_REQUEST_ID = b"x-request-id"
_MAX_REQUEST_ID = 128
# New request ids only tell requests apart in logs, so they need not be
# unpredictable; os.urandom would cost a system call per request.
_ids = random.Random()  # noqa: S311


class Forwarder:
    """Relays every request it gets to `upstream` with the credential added."""

    def __init__(
        self,
        upstream: str,
        credential: Credential,
        transport: httpx.AsyncBaseTransport,
        gate: Gate,
        *,
        iso8601: bool,
        default_headers: dict[str, str],
        timeout: httpx.Timeout,
        access_log: bool = True,
        body_timeout: float = 60.0,
    ) -> None:
        url = httpx.URL(upstream)
        self.origin = url.copy_with(raw_path=b"/")
        self.base_path = url.raw_path.rstrip(b"/")
        self.credential = credential
        self.transport = transport
        self.gate = gate
        self.requests = RequestPolicy(
            url.netloc.decode("ascii"), iso8601=iso8601, defaults=default_headers
        )
        self.responses = ResponsePolicy(url)
        self.timeouts = timeout.as_dict()
        self.access_log = access_log
        self._unavailable_warnings = RepeatLimit(60.0, time.monotonic)
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        request_id = _request_id(scope["headers"])
        token = REQUEST_ID.set(request_id)
        exchange = Exchange(receive, scope["method"], raw_path.decode("latin-1"), request_id)
        exchange.body_complete = not _declares_body(scope["headers"])
        # The server's protocol calls exchange.client_lost() when the client goes away.
        scope[EXCHANGE_SCOPE_KEY] = exchange
        started()
        try:
            await self._handle(scope, raw_path, exchange, send)
        finally:
            exchange.finish()
            record(exchange, access_log=self.access_log)
            REQUEST_ID.reset(token)

    async def _handle(self, scope: Scope, raw_path: bytes, exchange: Exchange, send: Send) -> None:
        if scope["method"] == "CONNECT" or not raw_path.startswith(b"/"):
            logger.warning("rejected a %s request with a non-origin-form target", scope["method"])
            await self._send_error(send, exchange, errors.BAD_REQUEST)
            return
        rejection = self.gate.refusal(scope, raw_path)
        if rejection is not None:
            await self._send_error(send, exchange, rejection)
            return

        try:
            await self._forward(scope, raw_path, exchange, send)
        except asyncio.CancelledError:
            if exchange.task is None:
                raise
            if exchange.client_gone:
                exchange.task.uncancel()
                logger.info("client disconnected before the response was complete")
                return
            # The server cancels what is still running when shutdown_timeout ends.
            # The client learns whether the request may have reached Nexus.
            exchange.task.uncancel()
            logger.warning("request cancelled at shutdown before its response was complete")
            if not exchange.response_started:
                shutdown = errors.SHUTDOWN_SENT if exchange.upstream_started else errors.SHUTDOWN
                await self._send_error(send, exchange, shutdown)
        except ClientDisconnect:
            logger.info("client disconnected while sending the request body")
        except BodyTooLarge:
            logger.warning("request body grew past max_body_size; upstream request aborted")
            if not exchange.response_started:
                await self._send_error(send, exchange, errors.BODY_TOO_LARGE_SENT)
        except BodyTimeout:
            logger.warning("request body paused past client_body_timeout; upstream request aborted")
            if not exchange.response_started:
                await self._send_error(send, exchange, errors.CLIENT_TIMEOUT)

    async def _forward(self, scope: Scope, raw_path: bytes, exchange: Exchange, send: Send) -> None:
        try:
            authorization = await self.credential.authorization()
        except CredentialUnavailable as exc:
            suppressed = self._unavailable_warnings.allow()
            if suppressed is not None:
                logger.warning(
                    "no credential to send: %s; responding 503%s", exc, repeats_note(suppressed)
                )
            await self._send_error(send, exchange, errors.CREDENTIAL_UNAVAILABLE)
            return

        request, framing = self._build_request(scope, raw_path, exchange, authorization)
        response = await self._send(request, exchange, send)
        if response is None:
            return

        if response.status_code == 401:
            fresh = await self._fresh_authorization(scope, framing, authorization)
            if fresh is not None:
                await response.aclose()
                authorization = fresh
                request, _ = self._build_request(scope, raw_path, exchange, authorization)
                response = await self._send(request, exchange, send)
                if response is None:
                    return

        try:
            await self._relay(scope, response, send, exchange, authorization)
        finally:
            await response.aclose()

    def _build_request(
        self, scope: Scope, raw_path: bytes, exchange: Exchange, authorization: bytes
    ) -> tuple[httpx.Request, Framing]:
        headers, framing = self.requests.apply(scope["headers"], authorization)
        headers.insert(-1, (_REQUEST_ID, exchange.request_id.encode()))
        target = self.base_path + raw_path
        if scope["query_string"] or EMPTY_QUERY_SCOPE_KEY in scope:
            target += b"?" + scope["query_string"]

        stream: httpx.AsyncByteStream
        if framing.has_body:
            stream = RequestBody(exchange, self.gate.max_body_size, self.body_timeout)
        else:
            stream = NO_BODY
            exchange.body_complete = True
            if scope["method"] not in _SAFE_METHODS:
                headers.insert(-1, _EMPTY_LENGTH)
        # The "target" extension (httpcore's name for it) sends path and query
        # byte for byte; httpx.URL would normalise dot segments and re-encode.
        extensions = {"timeout": self.timeouts, "target": target}
        request = httpx.Request(
            scope["method"], self.origin, headers=headers, stream=stream, extensions=extensions
        )
        return request, framing

    async def _send(
        self, request: httpx.Request, exchange: Exchange, send: Send
    ) -> httpx.Response | None:
        """Return the upstream's response, or None after sending the client an error."""
        started = time.perf_counter()
        exchange.upstream_started = True
        try:
            response = await self.transport.handle_async_request(request)
        except httpx.TransportError as exc:
            if exchange.body_error is not None:
                raise exchange.body_error from exc
            if exchange.client_gone:
                raise ClientDisconnect from exc
            await self._fail(send, exchange, exc)
            return None
        exchange.upstream_seconds = time.perf_counter() - started
        if response.status_code < 200:
            # An interim status as the final response (such as an unrequested 101
            # Switching Protocols) breaks HTTP/1.1, because no Upgrade header went up.
            await response.aclose()
            await self._fail(send, exchange, httpx.RemoteProtocolError("interim final status"))
            return None
        if response.status_code == 401:
            metrics.UPSTREAM_UNAUTHORIZED.inc()
        return response

    async def _fresh_authorization(
        self, scope: Scope, framing: Framing, authorization: bytes
    ) -> bytes | None:
        """After a 401: the new credential to send the request again with, if any.

        Only requests that are safe to repeat (RFC 9110 section 9.2.1) and had no
        body qualify, and only when the credential changed. Otherwise, or when
        no new credential can be had, the client gets the upstream's 401.
        """
        changed = await self.credential.rejected(authorization)
        if not changed or scope["method"] not in _SAFE_METHODS or framing.has_body:
            return None
        try:
            return await self.credential.authorization()
        except CredentialUnavailable as exc:
            logger.warning("no new credential after an upstream 401: %s", exc)
            return None

    async def _relay(
        self,
        scope: Scope,
        response: httpx.Response,
        send: Send,
        exchange: Exchange,
        authorization: bytes,
    ) -> None:
        headers = self.responses.apply(response.headers.raw, secret=_secret_of(authorization))
        headers.append((_REQUEST_ID, exchange.request_id.encode()))
        if response.status_code in _NO_BODY_STATUSES:
            # 204 and 304 never carry a body (RFC 9110 sections 15.3.5, 15.4.5); a
            # Content-Length on them would make the server wait for body bytes.
            headers = [
                (name, value) for name, value in headers if name.lower() != b"content-length"
            ]
        exchange.status = response.status_code
        exchange.response_started = True
        await send(
            {"type": "http.response.start", "status": response.status_code, "headers": headers}
        )
        if scope["method"] == "HEAD" or response.status_code in _NO_BODY_STATUSES:
            exchange.finish()
            await send({"type": "http.response.body", "body": b""})
            return

        # Every chunk is passed on as it arrives. With a Content-Length, the chunk
        # that completes it goes out with more_body=False, saving a send; the loop
        # still runs to the stream's end so the pooled connection is reusable.
        length = _content_length(headers)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        try:
            async for chunk in response.stream:
                exchange.bytes_out += len(chunk)
                complete = exchange.bytes_out == length
                if complete:
                    exchange.finish()
                await send({"type": "http.response.body", "body": chunk, "more_body": not complete})
        except httpx.TransportError as exc:
            # The status line is out: the only honest signal left is an aborted
            # connection, never a clean end of a truncated body.
            exchange.error_code = "ProxyUpstreamAborted"
            logger.warning(
                "upstream failed mid-response (%s); aborting the client connection",
                exc.__class__.__name__,
            )
            return
        if exchange.bytes_out != length or length == 0:
            exchange.finish()
            await send({"type": "http.response.body", "body": b""})

    async def _fail(self, send: Send, exchange: Exchange, exc: httpx.TransportError) -> None:
        error = errors.UPSTREAM_PROTOCOL_ERROR
        for kind, mapped in _FAILURES:
            if isinstance(exc, kind):
                error = mapped
                break
        # A protocol error quotes the upstream's bytes, which may echo the key.
        detail = "" if isinstance(exc, httpx.ProtocolError) else f" ({exc})"
        logger.warning(
            "upstream request failed: %s%s; responding %d %s",
            exc.__class__.__name__,
            detail,
            error.status,
            error.code,
        )
        await self._send_error(send, exchange, error)

    async def _send_error(self, send: Send, exchange: Exchange, error: errors.ProxyError) -> None:
        exchange.status = error.status
        exchange.error_code = error.code
        exchange.response_started = True
        extra = [(_REQUEST_ID, exchange.request_id.encode())]
        if not exchange.body_complete and not any(n == b"connection" for n, _ in error.headers):
            # The rest of the body would be read as the next request: close instead
            # (RFC 9112 section 9.6).
            extra.append((b"connection", b"close"))
        await errors.send_error(send, error, *extra)


def _declares_body(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
            return True
    return False


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def _secret_of(authorization: bytes) -> bytes:
    """Return the credential inside an `Authorization: Bearer <credential>` value."""
    return authorization.partition(b" ")[2]


def _request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """Return the client's X-Request-ID if printable ASCII of at most 128 bytes, else a new one."""
    for name, value in headers:
        if name == _REQUEST_ID:
            if 0 < len(value) <= _MAX_REQUEST_ID and all(0x21 <= byte <= 0x7E for byte in value):
                return value.decode("ascii")
            break
    return f"{_ids.getrandbits(128):032x}"
