"""The upstream transport: httpx's transport interface over aiohttp's client.

httpx's own pool (httpcore) checks every pooled connection on every request, so
its cost grows with the requests in flight; aiohttp's does not. The forwarder
still speaks httpx (`httpx.Request` in, `httpx.Response` out, httpx exceptions),
and this module keeps the contract on top of aiohttp:

- The request target is sent byte for byte, headers keep their order and
  repeats, and nothing is added (no Accept, Accept-Encoding, User-Agent or
  Content-Type of aiohttp's own). Bodies are neither compressed nor decompressed,
  no cookie is kept, no redirect is followed, no proxy variable is read.
- A request that may have reached the upstream is never sent again. The only
  repeat is for GET, HEAD and OPTIONS without a body sent on a pooled
  connection that the upstream had closed meanwhile (RFC 9112 section 9.3.1).
- Errors map to the httpx exception that tells whether anything was sent:
  ConnectError, ConnectTimeout, PoolTimeout and ProxyError mean nothing was.
- Timeouts: `connect` for a new connection, `pool` for a free one (at most
  `max_connections` requests are in flight), `write` for
  each piece of the body the upstream is slow to take, `read` for the response
  head once the body is sent, and for each later read of the response body.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from types import SimpleNamespace

import aiohttp
import httpx
import yarl
from multidict import CIMultiDict

__all__ = ["UpstreamTransport"]

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

# aiohttp adds these by default, but the upstream must receive the client's only.
_SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")

_CHUNK = 64 * 1024


class UpstreamTransport(httpx.AsyncBaseTransport):
    """An httpx transport that sends requests with one pooled aiohttp session."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext,
        max_connections: int,
        timeout: httpx.Timeout,
        proxy: str | None = None,
    ) -> None:
        self.ssl_context = ssl_context
        self.max_connections = max_connections
        self.timeout = timeout
        self.proxy = proxy
        self._slots = asyncio.Semaphore(max_connections)
        self._session: aiohttp.ClientSession | None = None
        self._tracing = aiohttp.TraceConfig()
        self._tracing.on_connection_reuseconn.append(_note_reuse)

    async def __aenter__(self) -> UpstreamTransport:
        """Open the connection pool; it must be opened inside the running event loop."""
        connector = aiohttp.TCPConnector(
            limit=self.max_connections, limit_per_host=0, ssl=self.ssl_context
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            auto_decompress=False,
            trust_env=False,
            trace_configs=[self._tracing],
            # The wait for a free connection is bounded by `_slots` before aiohttp
            # is asked, so aiohttp's connect timeout covers connecting only.
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=self.timeout.connect,
                sock_connect=self.timeout.connect,
                sock_read=None,
            ),
        )
        # NOTE: aiohttp also repeats PUT and DELETE on a closed pooled connection and
        # offers no public switch. This private flag turns its repeat off, so that
        # `handle_async_request` can repeat safe methods only.
        self._session._retry_connection = False
        return self

    async def aclose(self) -> None:
        """Close every pooled connection."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send `request` and return the response with its body still to be read."""
        if self._session is None:
            raise RuntimeError("UpstreamTransport used outside `async with`")
        headers, has_body = _aiohttp_headers(request.headers.raw)
        url = _url(request.url)
        may_repeat = request.method in _SAFE_METHODS and not has_body

        attempt = _Attempt()
        try:
            async with asyncio.timeout(self.timeout.pool):
                await self._slots.acquire()
        except TimeoutError:
            raise httpx.PoolTimeout("no free upstream connection") from None
        try:
            try:
                response = await self._send(request, url, headers, has_body, attempt)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                stale = attempt.reused and not isinstance(exc, aiohttp.ClientConnectorError)
                if not (may_repeat and stale):
                    raise
                attempt.reused = False
                response = await self._send(request, url, headers, has_body, attempt)
        except BaseException as exc:
            self._slots.release()
            error = self._httpx_error(exc, writing=attempt.writing)
            if error is exc:
                raise
            raise error from exc

        return httpx.Response(
            response.status,
            headers=response.raw_headers,
            stream=_ResponseBody(self, response, self.timeout.read),
            request=request,
        )

    async def _send(
        self,
        request: httpx.Request,
        url: yarl.URL,
        headers: CIMultiDict[str],
        has_body: bool,
        attempt: _Attempt,
    ) -> aiohttp.ClientResponse:
        assert self._session is not None
        loop = asyncio.get_running_loop()
        read = self.timeout.read
        async with asyncio.timeout(None) as deadline:
            data: AsyncIterator[bytes] | None = None
            if has_body:
                assert isinstance(request.stream, httpx.AsyncByteStream)
                data = _timed_body(request.stream, deadline, attempt, self.timeout)
            elif read is not None:
                deadline.reschedule(loop.time() + read)
            return await self._session.request(
                request.method,
                url,
                headers=headers,
                data=data,
                allow_redirects=False,
                proxy=self.proxy,
                trace_request_ctx=attempt,
            )

    def _httpx_error(self, exc: BaseException, *, writing: bool = False) -> BaseException:
        """Return the httpx exception for an aiohttp failure, or `exc` when it is not one."""
        message = exc.__class__.__name__
        if isinstance(exc, aiohttp.ClientProxyConnectionError | aiohttp.ClientHttpProxyError):
            return httpx.ProxyError(message)
        if isinstance(exc, aiohttp.ClientConnectorError):
            return httpx.ConnectError(f"{message}: {exc.os_error}")
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return httpx.ConnectTimeout(message)
        if isinstance(exc, TimeoutError):
            return httpx.WriteTimeout(message) if writing else httpx.ReadTimeout(message)
        if isinstance(exc, aiohttp.ClientOSError):
            return httpx.ReadError(message)
        if isinstance(exc, aiohttp.ClientError):
            return httpx.RemoteProtocolError(message)
        return exc


class _Attempt:
    """One try of a request: whether it went out on a pooled connection, and its phase."""

    __slots__ = ("reused", "writing")

    def __init__(self) -> None:
        self.reused = False
        self.writing = False


async def _note_reuse(
    session: aiohttp.ClientSession,
    context: SimpleNamespace,
    params: aiohttp.TraceConnectionReuseconnParams,
) -> None:
    context.trace_request_ctx.reused = True


async def _timed_body(
    stream: httpx.AsyncByteStream,
    deadline: asyncio.Timeout,
    attempt: _Attempt,
    timeout: httpx.Timeout,
) -> AsyncIterator[bytes]:
    """Yield the request body, moving `deadline` so each phase has its own timeout.

    While the client's next piece is awaited, no upstream deadline runs, because
    the client's own timeout applies. While aiohttp writes a piece, `write`
    applies. Once the body is sent, `read` applies to the wait for the response head.
    """
    loop = asyncio.get_running_loop()
    async for chunk in stream:
        attempt.writing = True
        if timeout.write is not None:
            deadline.reschedule(loop.time() + timeout.write)
        yield chunk
        attempt.writing = False
        deadline.reschedule(None)
    if timeout.read is not None:
        deadline.reschedule(loop.time() + timeout.read)


class _ResponseBody(httpx.AsyncByteStream):
    """The response body as aiohttp receives it, each read bounded by the read timeout."""

    def __init__(
        self, transport: UpstreamTransport, response: aiohttp.ClientResponse, read: float | None
    ) -> None:
        self.transport = transport
        self.response = response
        self.read = read
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        content = self.response.content
        while True:
            try:
                async with asyncio.timeout(self.read):
                    chunk = await content.readany()
            except BaseException as exc:
                error = self.transport._httpx_error(exc)
                if error is exc:
                    raise
                raise error from exc
            if not chunk:
                return
            yield chunk

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.transport._slots.release()
        # A fully read body returns the connection to the pool; any other is closed.
        self.response.release()


def _aiohttp_headers(raw: list[tuple[bytes, bytes]]) -> tuple[CIMultiDict[str], bool]:
    """Return the headers for aiohttp, and whether a body follows.

    Transfer-Encoding is left out: aiohttp frames a body without Content-Length
    as chunked itself.
    """
    headers: CIMultiDict[str] = CIMultiDict()
    has_body = False
    for name, value in raw:
        lowered = name.lower()
        if lowered == b"transfer-encoding":
            has_body = True
            continue
        if lowered == b"content-length":
            has_body = True
        headers.add(name.decode("latin-1"), value.decode("latin-1"))
    return headers, has_body


def _url(url: httpx.URL) -> yarl.URL:
    """Return the aiohttp URL with the exact request target of `url`."""
    path, _, query = url.raw_path.partition(b"?")
    return yarl.URL.build(
        scheme=url.scheme,
        host=url.host,
        port=url.port,
        path=path.decode("latin-1"),
        query_string=query.decode("latin-1"),
        encoded=True,
    )
