"""Upstream traffic through an egress proxy: absolute-form requests and CONNECT tunnels.

A stand-in forward proxy on 127.0.0.1 records every request head it receives and
relays only to the stand-in upstream's port, so no test can reach another host.
The proxy under test gets the egress proxy from the `egress_proxy` setting, or,
for a URL with user info (which that setting rejects), from HTTP_PROXY or
HTTPS_PROXY with `egress_proxy` unset.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.conftest import KEY, RunningProxy, raw_exchange, serve_proxy
from tests.upstream import Reply, StandInUpstream

pytestmark = pytest.mark.timeout(20)

logger = logging.getLogger(__name__)

PROXY_USER = "egress-user"
# A secret shaped like the test key KEY.
PROXY_PASSWORD = "nx-egress-pass-8d41e7"
PROXY_AUTHORIZATION = (
    "Basic " + base64.b64encode(f"{PROXY_USER}:{PROXY_PASSWORD}".encode()).decode()
)

# Every byte value, so any decoding or re-encoding on the way shows.
REPLY_BODY = b'{"message":"ok","errors":null,"values":{}}' + bytes(range(256))
REPLY_HEADERS = [("content-type", "application/octet-stream"), ("x-upstream-marker", "m-7f3a")]
# Encoded slash, dot segment, "+", "@" and an encoded "|": all must pass unchanged.
RAW_TARGET = "/customer/a%2Fb/./C1?email=a+b@x.com&status=BLOCKED%7CPAYOUTONHOLD&page=1"

THREAD_JOIN_TIMEOUT = 5.0
READ_SIZE = 65536


@dataclass
class EgressRequest:
    """One request head as the stand-in egress proxy received it."""

    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]

    def header(self, name: str) -> list[str]:
        """Return every value of header `name` (case-insensitive), in arrival order."""
        key = name.lower().encode("latin-1")
        return [value.decode("latin-1") for field, value in self.headers if field.lower() == key]


_PROXY_ONLY_HEADERS = frozenset({b"proxy-authorization", b"proxy-connection"})

_AUTHENTICATION_REQUIRED = (
    b"HTTP/1.1 407 Proxy Authentication Required\r\n"
    b'Proxy-Authenticate: Basic realm="egress"\r\n'
    b"Content-Length: 0\r\nConnection: close\r\n\r\n"
)
_BAD_GATEWAY = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_NOT_IMPLEMENTED = b"HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_TUNNEL_OPEN = b"HTTP/1.1 200 Connection established\r\n\r\n"


class StandInEgressProxy:
    """An HTTP forward proxy on 127.0.0.1, served by an event loop in a background thread.

    It relays absolute-form requests for `http://127.0.0.1:<upstream_port>` in origin
    form, without Proxy-Authorization and Proxy-Connection, as a real proxy does. It
    relays only bodies framed by Content-Length, and sends 501 for chunked ones.
    `CONNECT 127.0.0.1:<upstream_port>` opens a tunnel that copies bytes both ways.
    Any other target gets 502 and no connection is made. With `required_authorization`,
    a request whose Proxy-Authorization is not exactly that one value gets 407. With
    `ssl_context`, clients must speak TLS to the proxy itself (an https:// proxy URL).

    Attributes:
        port: where the proxy listens, set by ``__enter__``.
        requests: every request head received, in arrival order.
        tunnels: CONNECT tunnels opened to the upstream.
    """

    def __init__(
        self,
        upstream_port: int,
        required_authorization: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.upstream_port = upstream_port
        self.required_authorization = required_authorization
        self.ssl_context = ssl_context
        self.port = 0
        self.requests: list[EgressRequest] = []
        self.tunnels = 0
        self._authority = f"127.0.0.1:{upstream_port}".encode()
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._startup_error: BaseException | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._transports: set[asyncio.BaseTransport] = set()

    @property
    def url(self) -> str:
        """The proxy's URL without user info."""
        return f"{self._scheme}://127.0.0.1:{self.port}"

    def url_with_credentials(self) -> str:
        """The proxy's URL with PROXY_USER and PROXY_PASSWORD as user info."""
        return f"{self._scheme}://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{self.port}"

    @property
    def _scheme(self) -> str:
        return "http" if self.ssl_context is None else "https"

    def __enter__(self) -> StandInEgressProxy:
        self._thread = threading.Thread(target=self._run, name="stand-in-egress", daemon=True)
        self._thread.start()
        if not self._ready.wait(THREAD_JOIN_TIMEOUT):
            raise RuntimeError("the stand-in egress proxy did not start")
        if self._startup_error is not None:
            self._thread.join(THREAD_JOIN_TIMEOUT)
            raise RuntimeError(
                "the stand-in egress proxy failed to listen"
            ) from self._startup_error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(THREAD_JOIN_TIMEOUT)
        if self._thread.is_alive():
            raise RuntimeError("the stand-in egress proxy did not stop")

    # Event loop thread.

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as error:  # handed to __enter__
            self._startup_error = error
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stop.wait()
        server.close()
        for transport in list(self._transports):
            transport.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    def _track(self, task: asyncio.Task[Any]) -> None:
        """Keep `task` in the set that the stop cancels, until it ends."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _record(self, request: EgressRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _authorized(self, request: EgressRequest) -> bool:
        if self.required_authorization is None:
            return True
        return request.header("proxy-authorization") == [self.required_authorization]

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._transports.add(writer.transport)
        return reader, writer

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._track(task)
        self._transports.add(writer.transport)
        upstream: asyncio.StreamWriter | None = None
        responses: asyncio.Task[None] | None = None
        origin = b"http://" + self._authority
        try:
            while (request := await _read_head(reader)) is not None:
                self._record(request)
                if not self._authorized(request):
                    writer.write(_AUTHENTICATION_REQUIRED)
                    break
                if request.method == b"CONNECT":
                    await self._tunnel(request, reader, writer)
                    break
                if not request.target.startswith(origin + b"/"):
                    writer.write(_BAD_GATEWAY)
                    break
                if request.header("transfer-encoding"):
                    writer.write(_NOT_IMPLEMENTED)
                    break
                if upstream is None:
                    upstream_reader, upstream = await self._open_upstream()
                    # Responses come back in request order, so bytes are copied as they are.
                    responses = asyncio.create_task(_copy(upstream_reader, writer))
                    self._track(responses)
                upstream.write(_origin_form(request, len(origin)))
                length = int((request.header("content-length") or ["0"])[0])
                if length:
                    upstream.write(await reader.readexactly(length))
        except (ConnectionError, asyncio.IncompleteReadError) as error:
            logger.info("stand-in egress proxy: connection ended: %r", error)
        except asyncio.CancelledError:
            # __exit__ cancels the connections that are still open, which is a normal end.
            if self._stop is None or not self._stop.is_set():
                raise
        finally:
            if responses is not None:
                responses.cancel()
            if upstream is not None:
                upstream.transport.abort()
            # close() still sends what was written, such as a 407, before the FIN. Nothing
            # is awaited here, so a cancellation at stop cannot escape the handler.
            writer.close()

    async def _tunnel(
        self, request: EgressRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if request.target != self._authority:
            writer.write(_BAD_GATEWAY)
            return
        upstream_reader, upstream = await self._open_upstream()
        with self._lock:
            self.tunnels += 1
        writer.write(_TUNNEL_OPEN)
        directions = {
            asyncio.create_task(_copy(reader, upstream)),
            asyncio.create_task(_copy(upstream_reader, writer)),
        }
        try:
            # Either side closing ends the tunnel.
            await asyncio.wait(directions, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for direction in directions:
                direction.cancel()
            await asyncio.gather(*directions, return_exceptions=True)
            upstream.transport.abort()


async def _read_head(reader: asyncio.StreamReader) -> EgressRequest | None:
    """Read a request line and headers, or return None when the client closed first."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as error:
        if error.partial:
            raise
        return None
    lines = raw[:-4].split(b"\r\n")
    method, target, version = lines[0].split(b" ")
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name, value.strip(b" \t")))
    return EgressRequest(method, target, version, headers)


def _origin_form(request: EgressRequest, origin_length: int) -> bytes:
    """Return the request head as the upstream gets it: origin-form target, proxy headers gone."""
    lines = [b" ".join((request.method, request.target[origin_length:], request.version))]
    lines += [
        name + b": " + value
        for name, value in request.headers
        if name.lower() not in _PROXY_ONLY_HEADERS
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def _copy(source: asyncio.StreamReader, destination: asyncio.StreamWriter) -> None:
    """Copy bytes until `source` ends, then close `destination`."""
    try:
        while data := await source.read(READ_SIZE):
            destination.write(data)
            await destination.drain()
    except ConnectionError:
        pass
    finally:
        destination.close()


# Helpers for the client side.


def _get(proxy: RunningProxy, target: str, *extra_headers: str) -> bytes:
    """Send one GET on a new connection to the proxy and return the raw response."""
    lines = [f"GET {target} HTTP/1.1", "Host: proxy.local", *extra_headers, "", ""]
    return raw_exchange(proxy.port, "\r\n".join(lines).encode())


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def _header_values(response: bytes, name: bytes) -> list[bytes]:
    head = response.split(b"\r\n\r\n", 1)[0]
    values = []
    for line in head.split(b"\r\n")[1:]:
        field, _, value = line.partition(b":")
        if field.strip().lower() == name:
            values.append(value.strip())
    return values


def _body(response: bytes) -> bytes:
    return response.split(b"\r\n\r\n", 1)[1]


def _assert_proxy_error_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Check that nexus-proxy logged the failure as an httpx.ProxyError."""
    messages = [record.getMessage() for record in caplog.records if record.name == "nexus_proxy"]
    assert any("upstream request failed: ProxyError" in message for message in messages)


def _assert_unreachable(response: bytes) -> None:
    """Check the 502 envelope which reports that no byte reached the upstream."""
    assert _status(response) == 502
    assert _header_values(response, b"x-nexus-proxy-error") == [b"ProxyUpstreamUnreachable"]
    envelope = json.loads(_body(response))
    assert envelope["errors"] == ["ProxyUpstreamUnreachable"]
    assert envelope["values"] == {"upstreamReached": False}


@dataclass
class CertificateAuthority:
    """A trustme CA, and its certificate in a PEM file for the `ca_bundle` setting."""

    ca: trustme.CA
    path: Path

    def server_context(self) -> ssl.SSLContext:
        """Return a server TLS context with a certificate for 127.0.0.1 issued by this CA."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("127.0.0.1").configure_cert(context)
        return context


@pytest.fixture
def authority(tmp_path: Path) -> CertificateAuthority:
    ca = trustme.CA()
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return CertificateAuthority(ca, path)


def _upstream(authority: CertificateAuthority, scheme: str) -> StandInUpstream:
    context = authority.server_context() if scheme == "https" else None
    return StandInUpstream(Reply(headers=list(REPLY_HEADERS), body=REPLY_BODY), ssl_context=context)


@pytest.fixture
def http_upstream(authority: CertificateAuthority) -> Iterator[StandInUpstream]:
    with _upstream(authority, "http") as upstream:
        yield upstream


@pytest.fixture
def tls_upstream(authority: CertificateAuthority) -> Iterator[StandInUpstream]:
    with _upstream(authority, "https") as upstream:
        yield upstream


@pytest.fixture(params=["http", "https"])
def any_upstream(
    request: pytest.FixtureRequest, authority: CertificateAuthority
) -> Iterator[StandInUpstream]:
    with _upstream(authority, request.param) as upstream:
        yield upstream


def _upstream_url(upstream: StandInUpstream) -> str:
    # An HTTPS StandInUpstream names itself "localhost". The IP literal keeps name lookups out.
    scheme = "https" if upstream.url.startswith("https:") else "http"
    return f"{scheme}://127.0.0.1:{upstream.port}"


def _proxy_variable(upstream: StandInUpstream) -> str:
    """Return the environment variable that names the egress proxy for `upstream`."""
    return "HTTPS_PROXY" if upstream.url.startswith("https:") else "HTTP_PROXY"


# A Proxy-Authorization the client sends is for the hop to nexus-proxy only.
CLIENT_PROXY_AUTHORIZATION = "Proxy-Authorization: Basic Y2xpZW50OmNsaWVudA=="


@pytest.mark.parametrize("user_info", [False, True], ids=["setting", "variable-with-user-info"])
def test_http_upstream_through_egress_proxy(
    http_upstream: StandInUpstream,
    make_proxy: Callable[..., RunningProxy],
    monkeypatch: pytest.MonkeyPatch,
    user_info: bool,
) -> None:
    upstream = http_upstream
    required = PROXY_AUTHORIZATION if user_info else None
    with StandInEgressProxy(upstream.port, required) as egress:
        if user_info:
            monkeypatch.setenv("HTTP_PROXY", egress.url_with_credentials())
            proxy = make_proxy(upstream.url, egress_proxy=None)
        else:
            proxy = make_proxy(upstream.url, egress_proxy=egress.url)
        response = _get(proxy, RAW_TARGET, CLIENT_PROXY_AUTHORIZATION)

    assert _status(response) == 200
    assert _body(response) == REPLY_BODY
    assert _header_values(response, b"content-type") == [b"application/octet-stream"]
    assert _header_values(response, b"x-upstream-marker") == [b"m-7f3a"]
    [seen] = egress.requests
    assert seen.method == b"GET"
    assert seen.version == b"HTTP/1.1"
    assert seen.target == f"http://127.0.0.1:{upstream.port}{RAW_TARGET}".encode()
    assert seen.header("host") == [f"127.0.0.1:{upstream.port}"]
    # Exactly the configured credential goes to the egress proxy, never the client's.
    # The stand-in removes it before relaying, as a real proxy does, so the HTTPS
    # test below is the one that checks that none reaches the upstream.
    assert seen.header("proxy-authorization") == ([PROXY_AUTHORIZATION] if user_info else [])
    [received] = upstream.requests
    assert received.target == RAW_TARGET.encode()
    assert received.header("authorization") == [f"Bearer {KEY}"]
    assert received.header("request_iso8601") == ["true"]


def test_https_upstream_through_connect_tunnel(
    tls_upstream: StandInUpstream,
    authority: CertificateAuthority,
    make_proxy: Callable[..., RunningProxy],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upstream = tls_upstream
    with StandInEgressProxy(upstream.port, PROXY_AUTHORIZATION) as egress:
        monkeypatch.setenv("HTTPS_PROXY", egress.url_with_credentials())
        proxy = make_proxy(_upstream_url(upstream), egress_proxy=None, ca_bundle=authority.path)
        first = _get(proxy, RAW_TARGET, CLIENT_PROXY_AUTHORIZATION)
        second = _get(proxy, "/customer/C2")

    for response in first, second:
        assert _status(response) == 200
        assert _body(response) == REPLY_BODY
        assert _header_values(response, b"content-type") == [b"application/octet-stream"]
        assert _header_values(response, b"x-upstream-marker") == [b"m-7f3a"]
    # One CONNECT and one upstream connection: the second request reused the tunnel.
    [connect] = egress.requests
    target = f"127.0.0.1:{upstream.port}"
    assert connect.method == b"CONNECT"
    assert connect.target == target.encode()
    assert connect.version == b"HTTP/1.1"
    assert connect.header("host") == [target]
    assert connect.header("proxy-authorization") == [PROXY_AUTHORIZATION]
    assert egress.tunnels == 1
    assert upstream.connections == 1
    assert [request.target for request in upstream.requests] == [
        RAW_TARGET.encode(),
        b"/customer/C2",
    ]
    for request in upstream.requests:
        assert request.header("authorization") == [f"Bearer {KEY}"]
        assert request.header("request_iso8601") == ["true"]
        # Nothing inside the tunnel removes headers, so this checks nexus-proxy itself.
        assert request.header("proxy-authorization") == []


def test_egress_proxy_refusal_is_unreachable(
    any_upstream: StandInUpstream,
    authority: CertificateAuthority,
    make_proxy: Callable[..., RunningProxy],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The egress proxy requires credentials and the configured URL has none, so it sends 407.
    upstream = any_upstream
    with StandInEgressProxy(upstream.port, PROXY_AUTHORIZATION) as egress:
        proxy = make_proxy(
            _upstream_url(upstream), egress_proxy=egress.url, ca_bundle=authority.path
        )
        response = _get(proxy, "/customer")

    _assert_unreachable(response)
    _assert_proxy_error_logged(caplog)
    [refused] = egress.requests
    assert refused.method == (b"CONNECT" if upstream.url.startswith("https:") else b"GET")
    assert refused.header("proxy-authorization") == []
    assert upstream.connections == 0


def test_egress_proxy_port_closed_is_unreachable(
    any_upstream: StandInUpstream,
    authority: CertificateAuthority,
    make_proxy: Callable[..., RunningProxy],
    caplog: pytest.LogCaptureFixture,
) -> None:
    upstream = any_upstream
    # A bound socket that never listens rejects connections, and its port stays taken.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        egress_url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        proxy = make_proxy(
            _upstream_url(upstream), egress_proxy=egress_url, ca_bundle=authority.path
        )
        response = _get(proxy, "/customer")

    _assert_unreachable(response)
    _assert_proxy_error_logged(caplog)
    assert upstream.connections == 0


def test_proxy_password_never_logged_or_returned(
    tls_upstream: StandInUpstream,
    authority: CertificateAuthority,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    upstream = tls_upstream
    other_credentials = "Basic " + base64.b64encode(b"other:other").decode()
    responses = []
    with (
        StandInEgressProxy(upstream.port, PROXY_AUTHORIZATION) as accepting,
        StandInEgressProxy(upstream.port, other_credentials) as refusing,
        socket.socket() as closed,
    ):
        closed.bind(("127.0.0.1", 0))
        egress_urls = [
            accepting.url_with_credentials(),
            refusing.url_with_credentials(),
            f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{closed.getsockname()[1]}",
        ]
        for egress_url in egress_urls:
            monkeypatch.setenv("HTTPS_PROXY", egress_url)
            # Each proxy stops before the checks, so the lines it logs after the
            # response, such as the access line, are captured too.
            with serve_proxy(
                _upstream_url(upstream), egress_proxy=None, ca_bundle=authority.path
            ) as proxy:
                responses.append(_get(proxy, "/customer"))

    assert [_status(response) for response in responses] == [200, 502, 502]
    # Both failures were logged, so the check below covers the error paths too.
    failures = [
        record
        for record in caplog.records
        if record.name == "nexus_proxy" and "ProxyUpstreamUnreachable" in record.getMessage()
    ]
    assert len(failures) == 2
    for secret in (PROXY_PASSWORD, PROXY_AUTHORIZATION.split()[1]):
        assert secret not in caplog.text
        for response in responses:
            assert secret.encode() not in response


def test_https_egress_proxy_url_gets_tls(
    any_upstream: StandInUpstream,
    authority: CertificateAuthority,
    make_proxy: Callable[..., RunningProxy],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An https:// proxy URL means TLS to the proxy itself, as httpx and curl (7.52.0 and
    # later) read it, so the Proxy-Authorization credentials never travel in cleartext.
    upstream = any_upstream
    with StandInEgressProxy(
        upstream.port, PROXY_AUTHORIZATION, authority.server_context()
    ) as egress:
        monkeypatch.setenv(_proxy_variable(upstream), egress.url_with_credentials())
        proxy = make_proxy(_upstream_url(upstream), egress_proxy=None, ca_bundle=authority.path)
        response = _get(proxy, "/customer")

    assert _status(response) == 200
    assert _body(response) == REPLY_BODY
    [seen] = egress.requests
    assert seen.header("proxy-authorization") == [PROXY_AUTHORIZATION]
    assert len(upstream.requests) == 1
