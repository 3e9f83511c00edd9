"""The upstream transport: httpx's transport interface over a small HTTP/1.1 pool.

Each connection is an asyncio protocol that parses responses with httptools
(llhttp, the parser uvicorn uses for requests). The forwarder still speaks httpx:
`httpx.Request` in, `httpx.Response` out, httpx exceptions. Contract:

- The request target (the "target" extension, as httpcore names it, or else the
  URL's raw path) and the headers are sent exactly as given, in their order and
  with their repeats. Nothing is added, compressed, decompressed or followed,
  and no cookie is kept. A chunked body is framed here, chunk for chunk.
- A request that may have reached the upstream is never sent again. The only
  repeat is for GET, HEAD and OPTIONS without a body when they went out on a
  pooled connection that the upstream had closed and nothing came back
  (RFC 9112 section 9.3.1). The repeat uses a new connection.
- A connection goes back to the pool only after a complete response, with
  keep-alive, and with nothing received past the response's end. Bytes that
  arrive on an idle pooled connection close it, so they can never be read as
  the response to a later request.
- Errors map to the httpx exception that tells whether anything was sent:
  ConnectError, ConnectTimeout, PoolTimeout and ProxyError mean nothing was.
- Timeouts: `pool` for a free slot (at most `max_connections` requests are in
  flight), `connect` for a new connection (with the egress proxy's CONNECT),
  `write` for each wait while the upstream is slow to take the body, and `read`
  for the response head once the request is sent and for each wait for body data.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import ssl
from collections.abc import AsyncIterator
from typing import cast

import httptools
import httpx

__all__ = ["UpstreamTransport"]

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_NO_BODY_STATUSES = frozenset({204, 304})

# A response head larger than this is a protocol error, not a memory cost.
_MAX_HEAD = 64 * 1024
# Response body bytes buffered before reading from the upstream pauses, until the
# client has taken them all: a slow client slows the upstream down instead.
_HIGH_WATER = 256 * 1024
# Seconds an idle pooled connection is kept. Servers commonly close idle connections
# after 5 s to 2 min (an estimate), and a closed one is replaced at no risk.
_KEEPALIVE_EXPIRY = 15.0

Origin = tuple[str, str, int]

_NO_RESPONSE = "upstream closed the connection without a response"


class _UnsupportedCoding(Exception):
    """A response's Transfer-Encoding is not just chunked."""


class _Stale(Exception):
    """A pooled connection closed before any byte of a response came back."""


class UpstreamTransport(httpx.AsyncBaseTransport):
    """An httpx transport that sends HTTP/1.1 requests over pooled keep-alive connections."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext,
        max_connections: int,
        timeout: httpx.Timeout,
        proxy: str | None = None,
        keepalive_expiry: float = _KEEPALIVE_EXPIRY,
    ) -> None:
        self.ssl_context = ssl_context
        self.max_connections = max_connections
        self.timeout = timeout
        self.proxy = httpx.URL(proxy) if proxy else None
        self._proxy_authorization = _basic_authorization(self.proxy)
        self.keepalive_expiry = keepalive_expiry
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: dict[Origin, list[_Connection]] = {}
        self._connections: set[_Connection] = set()

    async def __aenter__(self) -> UpstreamTransport:
        return self

    async def aclose(self) -> None:
        """Close every connection, pooled or in use."""
        for connection in list(self._connections):
            connection.abort()
        self._idle.clear()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send `request` and return the response with its body still to be read."""
        url = request.url
        origin = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        headers = request.headers.raw
        chunked, has_body = _framing(headers)
        target = request.extensions.get("target") or url.raw_path
        head = self._head(request.method, origin, target, headers)
        stream = request.stream if has_body else None
        assert stream is None or isinstance(stream, httpx.AsyncByteStream)

        await self._acquire_slot()
        connection = None
        try:
            connection = self._pooled(origin)
            if connection is not None:
                try:
                    await connection.send(request.method, head, stream, chunked)
                except _Stale:
                    connection.abort()
                    connection = None
                    if request.method not in _SAFE_METHODS or has_body:
                        raise httpx.RemoteProtocolError(_NO_RESPONSE) from None
            if connection is None:
                connection = await self._connect(origin)
                await connection.send(request.method, head, stream, chunked)
            if connection.status == 407 and self.proxy is not None and origin[0] == "http":
                # Only a proxy sends 407 (RFC 9110 section 15.5.8): the egress proxy
                # rejected the request, so it went no further.
                raise httpx.ProxyError("egress proxy rejected the request with 407")
        except BaseException:
            if connection is not None:
                connection.abort()
            self._slots.release()
            raise

        return httpx.Response(
            connection.status,
            headers=connection.headers,
            stream=_ResponseBody(self, connection),
            request=request,
        )

    def _head(
        self, method: str, origin: Origin, target: bytes, headers: list[tuple[bytes, bytes]]
    ) -> bytes:
        """Return the request line and headers as they go on the wire."""
        if self.proxy is not None and origin[0] == "http":
            # Through a proxy, a plain-HTTP request names its origin (RFC 9112 section 3.2.2).
            target = _authority(origin, "http://") + target
            headers = headers + self._proxy_authorization
        parts = [method.encode("ascii"), b" ", target, b" HTTP/1.1\r\n"]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        head = b"".join(parts)
        # Every CR and LF must be a line end of ours, so no header can smuggle another.
        lines = len(headers) + 2
        if head.count(b"\n") != lines or head.count(b"\r") != lines or b"\0" in head:
            raise httpx.LocalProtocolError("a request header contains CR, LF or NUL")
        return head

    async def _acquire_slot(self) -> None:
        if not self._slots.locked():
            await self._slots.acquire()
            return
        try:
            async with asyncio.timeout(self.timeout.pool):
                await self._slots.acquire()
        except TimeoutError:
            raise httpx.PoolTimeout("no free upstream connection") from None

    def _pooled(self, origin: Origin) -> _Connection | None:
        """Return the most recently used idle connection to `origin`, if one is usable."""
        idle = self._idle.get(origin)
        if not idle:
            return None
        deadline = idle[-1].loop.time() - self.keepalive_expiry
        while idle:
            connection = idle.pop()
            if connection.usable and connection.idle_since > deadline:
                connection.active = True
                return connection
            connection.abort()
        return None

    def _release(self, connection: _Connection, reusable: bool) -> None:
        self._slots.release()
        if not reusable:
            connection.abort()
            return
        connection.active = False
        connection.idle_since = connection.loop.time()
        idle = self._idle.setdefault(connection.origin, [])
        idle.append(connection)
        # The oldest idle connections are at the front, so expired ones are closed from there.
        deadline = connection.idle_since - self.keepalive_expiry
        while idle[0].idle_since <= deadline:
            idle.pop(0).abort()

    def _forget(self, connection: _Connection) -> None:
        """Drop a closed connection from the pool's records."""
        self._connections.discard(connection)
        idle = self._idle.get(connection.origin)
        if idle and connection in idle:
            idle.remove(connection)

    async def _connect(self, origin: Origin) -> _Connection:
        """Open a connection to `origin`, through the egress proxy when there is one."""
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        connection = _Connection(self, origin)
        tls = self.ssl_context if scheme == "https" else None
        try:
            async with asyncio.timeout(self.timeout.connect):
                if self.proxy is None:
                    await loop.create_connection(
                        lambda: connection,
                        host,
                        port,
                        ssl=tls,
                        server_hostname=host if tls else None,
                    )
                else:
                    # An https:// egress proxy is spoken to over TLS, checked like the upstream.
                    proxy_tls = self.ssl_context if self.proxy.scheme == "https" else None
                    proxy_port = self.proxy.port or (443 if proxy_tls else 80)
                    try:
                        await loop.create_connection(
                            lambda: connection,
                            self.proxy.host,
                            proxy_port,
                            ssl=proxy_tls,
                            server_hostname=self.proxy.host if proxy_tls else None,
                        )
                    except OSError as exc:
                        raise httpx.ProxyError(
                            f"egress proxy unreachable: {_describe(exc)}"
                        ) from exc
                    if tls is not None:
                        await self._tunnel(connection, origin, tls)
        except TimeoutError:
            connection.abort()
            raise httpx.ConnectTimeout("connecting to the upstream timed out") from None
        except OSError as exc:
            connection.abort()
            raise httpx.ConnectError(_describe(exc)) from exc
        except BaseException:
            connection.abort()
            raise
        connection.active = True
        self._connections.add(connection)
        return connection

    async def _tunnel(self, connection: _Connection, origin: Origin, tls: ssl.SSLContext) -> None:
        """Open a CONNECT tunnel through the egress proxy and start TLS inside it."""
        authority = _authority(origin, "")
        lines = [b"CONNECT " + authority + b" HTTP/1.1", b"Host: " + authority]
        lines += [name + b": " + value for name, value in self._proxy_authorization]
        head = b"\r\n".join(lines) + b"\r\n\r\n"
        connection.active = True
        try:
            await connection.send("CONNECT", head, None, chunked=False)
        except (httpx.TransportError, _Stale) as exc:
            raise httpx.ProxyError("egress proxy closed the connection during CONNECT") from exc
        if connection.status != 200:
            raise httpx.ProxyError(f"egress proxy rejected CONNECT with {connection.status}")
        await connection.start_tls(tls, origin[1])


class _Connection(asyncio.Protocol):
    """One upstream connection: writes a request, parses its response, flows both ways."""

    def __init__(self, pool: UpstreamTransport, origin: Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = _parser(self)
        self.active = False
        self.closed = False
        self.idle_since = 0.0
        self.used = False
        self.reading_paused = False
        self.writing_paused = False
        self.waiter: asyncio.Future[None] | None = None
        self._reset("GET")

    def _reset(self, method: str) -> None:
        self.method = method
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.received = 0
        self.head_done = False
        self.complete = False
        self.until_close = False
        self.keep_alive = False
        self.surplus = False
        # Whether an interim response contained "Connection: close".
        self.close_after = False
        self.error: httpx.TransportError | None = None
        self.body: collections.deque[bytes] = collections.deque()
        self.buffered = 0

    @property
    def usable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def abort(self) -> None:
        """Close the connection at once, so that a response still expected fails."""
        if self.transport is not None and not self.closed:
            self.transport.abort()
        self._lost(None)

    # Sending a request.

    async def send(
        self,
        method: str,
        head: bytes,
        stream: httpx.AsyncByteStream | None,
        chunked: bool,
    ) -> None:
        """Write one request and wait for its response head.

        Raises `_Stale` when a pooled connection turned out to be closed before
        anything of the response arrived.
        """
        reused = self.used
        self.used = True
        self._reset(method)
        if not self.usable:
            raise _Stale() if reused else httpx.WriteError("upstream connection closed")
        assert self.transport is not None
        if stream is None:
            self.transport.write(head)
        else:
            await self._send_body(head, stream, chunked)
        read = self.pool.timeout.read
        while not self.head_done and self.error is None:
            await self.wait(read, httpx.ReadTimeout)
        if self.head_done:
            return
        assert self.error is not None
        if reused and self.received == 0:
            raise _Stale()
        raise self.error

    async def _send_body(self, head: bytes, stream: httpx.AsyncByteStream, chunked: bool) -> None:
        """Write the head with the first piece of the body, then the rest as it comes."""
        assert self.transport is not None
        write = self.pool.timeout.write
        pending = head
        async for chunk in stream:
            if self.closed:
                break
            if chunked:
                if not chunk:
                    continue
                data = b"".join((pending, b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                data = pending + chunk if pending else chunk
            pending = b""
            self.transport.write(data)
            while self.writing_paused and not self.closed:
                if self.head_done:
                    # The upstream sent its response and stopped reading, so the rest
                    # of the body is not needed and the connection cannot be reused.
                    self.keep_alive = False
                    return
                await self.wait(write, httpx.WriteTimeout)
        else:
            end = b"0\r\n\r\n" if chunked else b""
            if (pending or end) and not self.closed:
                self.transport.write(pending + end)
            return
        # The connection closed while the body was being sent. A response head that
        # arrived before the close is still returned. Without one, the write failed.
        if not self.head_done:
            raise self.error or httpx.WriteError("upstream closed the connection mid-request")

    async def wait(self, timeout: float | None, expired: type[httpx.TimeoutException]) -> None:
        """Wait for data, an error or room to write, at most `timeout` seconds."""
        waiter = self.waiter = self.loop.create_future()
        timer = None
        if timeout is not None:
            timer = self.loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        except TimeoutError:
            phase = "write" if expired is httpx.WriteTimeout else "read"
            raise expired(f"upstream {phase} timed out") from None
        finally:
            self.waiter = None
            if timer is not None:
                timer.cancel()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _lost(self, exc: Exception | None) -> None:
        """Record that the connection is gone, and what that means for the response."""
        self.closed = True
        self.pool._forget(self)
        if self.active and not self.complete and self.error is None:
            if self.head_done and self.until_close and exc is None:
                self.complete = True
            elif self.head_done:
                self.error = httpx.ReadError("upstream closed the connection mid-response")
            else:
                self.error = httpx.RemoteProtocolError(_NO_RESPONSE)
        self._wake()

    async def start_tls(self, tls: ssl.SSLContext, host: str) -> None:
        """Switch this connection to TLS, as after a CONNECT tunnel opened."""
        assert self.transport is not None
        transport = await self.loop.start_tls(self.transport, self, tls, server_hostname=host)
        assert transport is not None
        self.transport = transport
        self.parser = _parser(self)
        self.used = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.active or self.surplus:
            # Unrequested bytes: the connection can never be trusted again.
            self.surplus = True
            self.abort()
            return
        self.received += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # A 101 Switching Protocols: no HTTP follows on this connection.
            self.complete = True
            self.keep_alive = False
            self._wake()
        except httptools.HttpParserError:
            if self.complete:
                self.surplus = True
            else:
                self._fail(httpx.RemoteProtocolError("upstream sent invalid HTTP"))
            return
        if not self.head_done and self.received > _MAX_HEAD:
            self._fail(httpx.RemoteProtocolError("upstream response head too large"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self._lost(exc)

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._wake()

    def _fail(self, error: httpx.TransportError) -> None:
        self.error = error
        self.abort()

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self.complete:
            self.surplus = True

    def on_header(self, name: bytes, value: bytes) -> None:
        # Fields after the head are trailer fields, which are not passed on.
        if not self.surplus and not self.head_done:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.surplus:
            return
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # An interim response. The final one follows on this connection.
            self.headers = []
            self.close_after = self.close_after or not self.parser.should_keep_alive()
            return
        framed = False
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == b"transfer-encoding":
                if value.strip().lower() != b"chunked":
                    # A coding the proxy cannot undo would reach the client unlabelled.
                    raise _UnsupportedCoding(value)
                framed = True
            elif lowered == b"content-length":
                framed = True
        self.status = status
        self.head_done = True
        self.keep_alive = self.parser.should_keep_alive() and not self.close_after
        if self.method == "HEAD" or status in _NO_BODY_STATUSES or self.method == "CONNECT":
            # llhttp has no setting for a response to HEAD, so it would wait for the
            # body that Content-Length declares. Such a connection is not reused.
            self.complete = True
            self.keep_alive = self.keep_alive and status in _NO_BODY_STATUSES
        else:
            self.until_close = not framed
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.complete or self.surplus:
            self.surplus = True
            return
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if not self.head_done or self.surplus:
            return
        if self.complete and self.method in ("HEAD", "CONNECT"):
            return
        # A trailer field may contain "Connection: close".
        self.keep_alive = self.keep_alive and self.parser.should_keep_alive()
        self.complete = True
        self._wake()

    def take(self) -> bytes:
        """Return the buffered body bytes and let the upstream send more."""
        chunk = self.body.popleft() if len(self.body) == 1 else b"".join(self.body)
        self.body.clear()
        self.buffered = 0
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()
        return chunk


class _ResponseBody(httpx.AsyncByteStream):
    """The response body as it arrives, each wait bounded by the read timeout."""

    def __init__(self, pool: UpstreamTransport, connection: _Connection) -> None:
        self.pool = pool
        self.connection = connection
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        connection = self.connection
        read = self.pool.timeout.read
        while True:
            if connection.body:
                yield connection.take()
            elif connection.complete:
                return
            elif connection.error is not None:
                raise connection.error
            else:
                await connection.wait(read, httpx.ReadTimeout)

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        connection = self.connection
        reusable = (
            connection.complete
            and connection.keep_alive
            and not connection.surplus
            and not connection.body
            and connection.usable
        )
        self.pool._release(connection, reusable)


def _framing(headers: list[tuple[bytes, bytes]]) -> tuple[bool, bool]:
    """Return whether the request body is chunked, and whether there is a body."""
    chunked = has_body = False
    for name, _ in headers:
        lowered = name.lower()
        if lowered == b"transfer-encoding":
            chunked = has_body = True
        elif lowered == b"content-length":
            has_body = True
    return chunked, has_body


def _basic_authorization(proxy: httpx.URL | None) -> list[tuple[bytes, bytes]]:
    """Return the Proxy-Authorization header for the user info in `proxy`, if any."""
    if proxy is None or not proxy.username:
        return []
    userinfo = f"{proxy.username}:{proxy.password}".encode()
    return [(b"Proxy-Authorization", b"Basic " + base64.b64encode(userinfo))]


def _authority(origin: Origin, prefix: str) -> bytes:
    _, host, port = origin
    if ":" in host:
        host = f"[{host}]"
    return f"{prefix}{host}:{port}".encode("ascii")


def _parser(connection: _Connection) -> httptools.HttpResponseParser:
    parser = httptools.HttpResponseParser(connection)
    # After a response with "Connection: close" (an interim one too), llhttp would
    # stop parsing. The connection decides instead: a final response after an
    # interim one is read, and anything else counts as surplus.
    parser.set_dangerous_leniencies(lenient_keep_alive=True)
    return parser


def _describe(exc: OSError) -> str:
    return f"{exc.__class__.__name__}: {exc}"


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())
