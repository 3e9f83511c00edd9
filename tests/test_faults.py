"""Fault injection: bad upstreams and bad clients, checked at both ends of the proxy.

Every case asserts what the client received (an envelope error, an aborted connection
or the intact body) and what the stand-in upstream received (how many requests, with
which body). The proxy runs with a 1 s upstream read timeout, so a case that hangs
shows as a time bound broken, not as a test that never ends.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from nexus_proxy import errors
from nexus_proxy.credentials import build_credential
from nexus_proxy.settings import Settings
from tests.conftest import KEY, RunningProxy
from tests.upstream import RecordedRequest, Reply, StandInUpstream

pytestmark = pytest.mark.timeout(30)

READ_TIMEOUT = 1.0
# Time a proxy may add beyond its configured timeouts before a case counts as a hang:
# loopback round trips and thread scheduling on a loaded two-core CI machine.
MARGIN = 1.5
TIMEOUTS = {
    "connect_timeout": 1.0,
    "read_timeout": READ_TIMEOUT,
    "write_timeout": 1.0,
    "pool_timeout": 1.0,
}
PAYMENT = b'{"accountCode":"XLM-GA7Q","amount":"14729.80374332","currency":"EURT"}'
PAYMENT_SHA256 = hashlib.sha256(PAYMENT).hexdigest()
CLIENT_TIMEOUT = httpx.Timeout(10.0)


@dataclass
class Outcome:
    """What a client received: a full response, or the transport error that ended it."""

    status: int | None
    headers: httpx.Headers
    body: bytes
    error: Exception | None
    seconds: float

    def envelope(self) -> Any:
        """The JSON body, for proxy-made error envelopes."""
        return json.loads(self.body)


def _exchange(url: str, method: str = "POST", content: Any = PAYMENT, **headers: str) -> Outcome:
    """Send one request on a new connection and read the raw body until its end or an error."""
    started = time.monotonic()
    status, received, body = None, httpx.Headers(), b""
    try:
        with (
            httpx.Client(timeout=CLIENT_TIMEOUT) as client,
            client.stream(method, url, content=content, headers=headers) as response,
        ):
            status, received = response.status_code, response.headers
            for piece in response.iter_raw():
                body += piece
    except httpx.TransportError as exc:
        return Outcome(status, received, body, exc, time.monotonic() - started)
    return Outcome(status, received, body, None, time.monotonic() - started)


def _header(reply: Reply, name: str) -> str | None:
    values = [value for key, value in reply.headers if key.lower() == name]
    return values[0] if values else None


# Upstream faults: what the client gets and what the upstream got.


@dataclass(frozen=True)
class Envelope:
    """The proxy's own error, sent before any byte of the upstream's response."""

    status: int
    code: str
    reached: bool


@dataclass(frozen=True)
class Aborted:
    """The client connection aborted after the response had started."""


@dataclass(frozen=True)
class Complete:
    """The upstream's response, delivered whole."""

    body: bytes


Expected = Envelope | Aborted | Complete
PROTOCOL_ERROR = Envelope(502, "ProxyUpstreamProtocolError", True)
# A fault that arrives together with the response head may be seen before the proxy
# relays the head, and so get the envelope instead of an aborted connection.
ABORTED_OR_ENVELOPE = (Aborted(), PROTOCOL_ERROR)

GZIP_BODY = gzip.compress(b'{"message":"Successfully processed your request"}' * 20)
UPSTREAM_FAULTS = [
    pytest.param(
        Reply(fail="hang"), Envelope(504, "ProxyUpstreamTimeout", True), id="accepts-never-answers"
    ),
    pytest.param(
        Reply(head_delay=READ_TIMEOUT + 1),
        Envelope(504, "ProxyUpstreamTimeout", True),
        id="headers-too-slow",
    ),
    pytest.param(Reply(head_delay=0.3, body=b"late"), Complete(b"late"), id="headers-slow-in-time"),
    pytest.param(
        Reply(fail="reset_before_response"),
        Envelope(502, "ProxyUpstreamProtocolError", True),
        id="reset-before-response",
    ),
    pytest.param(
        Reply(fail="close_before_response"),
        Envelope(502, "ProxyUpstreamProtocolError", True),
        id="close-before-response",
    ),
    pytest.param(
        Reply(fail="invalid"), Envelope(502, "ProxyUpstreamProtocolError", True), id="not-http"
    ),
    pytest.param(
        Reply(raw=b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n"),
        Envelope(502, "ProxyUpstreamProtocolError", True),
        id="invalid-header-line",
    ),
    pytest.param(
        Reply(raw=b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
        Envelope(502, "ProxyUpstreamProtocolError", True),
        id="conflicting-lengths",
    ),
    pytest.param(
        Reply(status=101, headers=[("Upgrade", "websocket"), ("Connection", "Upgrade")], body=b""),
        PROTOCOL_ERROR,
        id="unrequested-101",
    ),
    pytest.param(
        Reply(body=b"x" * 5000, fail="close_mid_body", fail_after=1000),
        ABORTED_OR_ENVELOPE,
        id="close-mid-body-length",
    ),
    pytest.param(
        Reply(body=b"x" * 5000, chunked=True, fail="close_mid_body", fail_after=1000),
        ABORTED_OR_ENVELOPE,
        id="close-mid-body-chunked",
    ),
    pytest.param(
        Reply(body=b"x" * 5000, fail="reset_mid_body", fail_after=1000),
        ABORTED_OR_ENVELOPE,
        id="reset-mid-body-length",
    ),
    pytest.param(
        Reply(body=b"x" * 5000, chunked=True, fail="reset_mid_body", fail_after=1000),
        ABORTED_OR_ENVELOPE,
        id="reset-mid-body-chunked",
    ),
    pytest.param(
        Reply(body=b"x" * 5000, fail="hang_mid_body", fail_after=1000),
        Aborted(),
        id="stalls-mid-body",
    ),
    pytest.param(
        Reply(raw=b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 60),
        ABORTED_OR_ENVELOPE,
        id="shorter-than-length-then-close",
    ),
    pytest.param(
        Reply(headers=[("Content-Length", "100")], body=b"x" * 60, raw_framing=True),
        Aborted(),
        id="shorter-than-length-kept-open",
    ),
    pytest.param(
        Reply(raw=b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n"),
        ABORTED_OR_ENVELOPE,
        id="invalid-chunk-size",
    ),
    pytest.param(
        Reply(chunks=[b"first", b"second"], chunked=True, chunk_delay=READ_TIMEOUT + 1),
        Aborted(),
        id="drip-slower-than-read-timeout",
    ),
    pytest.param(
        Reply(raw=b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloEXTRA"),
        # Complete by its Content-Length; the bytes after it may also be judged invalid.
        (Complete(b"hello"), PROTOCOL_ERROR),
        id="longer-than-length-then-close",
    ),
    pytest.param(
        Reply(informational=[100, 102, 103], body=b"final"),
        Complete(b"final"),
        id="informational-first",
    ),
    pytest.param(
        Reply(
            raw=b"HTTP/1.1 100 Continue\r\nConnection: close\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal"
        ),
        Complete(b"final"),
        id="informational-says-close",
    ),
    pytest.param(
        Reply(
            raw=b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n"
        ),
        PROTOCOL_ERROR,
        id="unsupported-transfer-coding",
    ),
    pytest.param(
        Reply(headers=[("Content-Encoding", "gzip")], body=GZIP_BODY),
        Complete(GZIP_BODY),
        id="gzip",
    ),
    pytest.param(
        Reply(headers=[], body=b"until the upstream closes", raw_framing=True),
        Complete(b"until the upstream closes"),
        id="close-delimited",
    ),
]


def _mismatch(outcome: Outcome, reply: Reply, expected: Expected) -> str | None:
    """Describe how `outcome` differs from `expected`, or return None when it matches."""
    match expected:
        case Envelope(status, code, reached):
            if outcome.error is not None or outcome.status != status:
                return f"expected a {status} envelope, got {outcome.status} {outcome.error!r}"
            if outcome.headers.get("x-nexus-proxy-error") != code:
                return f"expected X-Nexus-Proxy-Error {code}, got {outcome.headers}"
            if outcome.envelope().get("errors") != [code]:
                return f"expected errors [{code}], got {outcome.body!r}"
            if outcome.envelope()["values"] != {"upstreamReached": reached}:
                return f"expected upstreamReached {reached}, got {outcome.body!r}"
        case Aborted():
            if not isinstance(outcome.error, httpx.RemoteProtocolError | httpx.ReadError):
                return f"expected an aborted response, got {outcome.status} {outcome.error!r}"
            if outcome.status != 200:
                return f"expected the abort after a 200 head, got {outcome.status}"
        case Complete(body):
            if outcome.error is not None or outcome.status != 200 or outcome.body != body:
                return f"expected 200 {body!r}, got {outcome.status} {outcome.error!r}"
            if outcome.headers.get("content-encoding") != _header(reply, "content-encoding"):
                return f"expected the upstream's Content-Encoding, got {outcome.headers}"
    return None


@pytest.mark.parametrize(("reply", "expected"), UPSTREAM_FAULTS)
def test_upstream_fault_outcome(
    upstream: StandInUpstream,
    make_proxy: Callable[..., RunningProxy],
    reply: Reply,
    expected: Expected | tuple[Expected, ...],
) -> None:
    proxy = make_proxy(upstream.url, **TIMEOUTS)
    upstream.reply_with(reply)
    acceptable = expected if isinstance(expected, tuple) else (expected,)

    outcome = _exchange(proxy.url + "/token/payments")
    mismatches = [_mismatch(outcome, reply, one) for one in acceptable]

    assert outcome.seconds < READ_TIMEOUT + MARGIN
    assert outcome.status != 500
    assert None in mismatches, mismatches
    if outcome.error is not None or outcome.status != 200:
        # A failed upstream connection is closed, never handed to the next request.
        upstream.wait_until(lambda: upstream.closed_connections == upstream.connections)
    assert [request.method for request in upstream.requests] == ["POST"]
    assert upstream.requests[0].body_sha256 == PAYMENT_SHA256
    assert upstream.incomplete == []


def test_upstream_down_is_unreachable(make_proxy: Callable[..., RunningProxy]) -> None:
    # A bound socket that never listens: connecting to its port is refused, and no
    # other process can take the port while it stays bound.
    with socket.socket() as closed_port:
        closed_port.bind(("127.0.0.1", 0))
        proxy = make_proxy(f"http://127.0.0.1:{closed_port.getsockname()[1]}", **TIMEOUTS)

        outcome = _exchange(proxy.url + "/token/payments")

    assert outcome.seconds < TIMEOUTS["connect_timeout"] + MARGIN
    assert outcome.status == 502
    assert outcome.headers["x-nexus-proxy-error"] == "ProxyUpstreamUnreachable"
    assert outcome.envelope()["values"] == {"upstreamReached": False}


# Stale pooled connections: the upstream ends a keep-alive connection while it idles.


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_stale_closed_connection_replaced(
    make_proxy: Callable[..., RunningProxy], method: str
) -> None:
    with StandInUpstream(idle_timeout=0.2) as upstream:
        proxy = make_proxy(upstream.url, **TIMEOUTS)
        first = _exchange(proxy.url + "/token/payments", method)
        upstream.wait_until(lambda: upstream.idle_closed == 1)

        second = _exchange(proxy.url + "/token/payments", method)

    assert first.status == 200
    assert second.status == 200
    assert second.error is None
    assert [request.method for request in upstream.requests] == [method, method]
    assert upstream.connections == 2


def test_stale_dropped_connection_get_resent(make_proxy: Callable[..., RunningProxy]) -> None:
    # The upstream drops the idle connection without sending a FIN, so the pool cannot
    # see that it is stale and writes the request to it. RFC 9112 section 9.3.1 lets a
    # client send an idempotent request again after such a failure.
    with StandInUpstream(idle_timeout=0.2, idle_close="reset_on_request") as upstream:
        proxy = make_proxy(upstream.url, **TIMEOUTS)
        _exchange(proxy.url + "/customer/C1", "GET", None)
        upstream.wait_until(lambda: upstream.idle_closed == 1)

        second = _exchange(proxy.url + "/customer/C1", "GET", None)

    assert second.status == 200
    assert [request.target for request in upstream.requests] == [b"/customer/C1"] * 2


def test_stale_dropped_connection_post_never_twice(
    make_proxy: Callable[..., RunningProxy],
) -> None:
    with StandInUpstream(idle_timeout=0.2, idle_close="reset_on_request") as upstream:
        proxy = make_proxy(upstream.url, **TIMEOUTS)
        _exchange(proxy.url + "/customer/C1", "GET", None)
        upstream.wait_until(lambda: upstream.idle_closed == 1)

        outcome = _exchange(proxy.url + "/token/payments")
        posts = [request for request in upstream.requests if request.method == "POST"]

    # The upstream dropped the request unread, so the proxy must report the failure
    # (it cannot know how far the request got) rather than send the payment again.
    assert outcome.status == 502
    assert outcome.headers["x-nexus-proxy-error"] == "ProxyUpstreamProtocolError"
    assert outcome.envelope()["values"] == {"upstreamReached": True}
    assert posts == []
    assert upstream.incomplete == []


def test_surplus_bytes_never_answer_next_request(
    upstream: StandInUpstream, make_proxy: Callable[..., RunningProxy]
) -> None:
    surplus = b"HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\nnot your response"

    def reply(request: RecordedRequest) -> Reply:
        if request.target == b"/customer/C1":
            # A buggy upstream: 5 bytes declared, a whole extra response sent after them.
            return Reply(
                headers=[("Content-Length", "5")], body=b"hello" + surplus, raw_framing=True
            )
        return Reply(body=request.target)

    upstream.reply_with(reply)
    proxy = make_proxy(upstream.url, max_connections=1, **TIMEOUTS)

    # Many rounds, because whether the surplus stays in the connection depends on
    # timing. Most rounds leak, and then the responses shift by one: C1 gets C2's.
    rounds = 30
    firsts, seconds = [], []
    for round_number in range(rounds):
        firsts.append(_exchange(proxy.url + "/customer/C1", "GET", None).body)
        seconds.append(_exchange(proxy.url + f"/customer/C2-{round_number}", "GET", None).body)

    assert firsts == [b"hello"] * rounds
    assert seconds == [b"/customer/C2-%d" % round_number for round_number in range(rounds)]


def test_late_surplus_closes_idle_connection(
    upstream: StandInUpstream, make_proxy: Callable[..., RunningProxy]
) -> None:
    surplus = b"HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\nnot your response"

    def reply(request: RecordedRequest) -> Reply:
        if request.target == b"/customer/C1":
            # The surplus comes after the response is complete, while the
            # connection idles in the pool.
            return Reply(
                headers=[("Content-Length", "5")],
                chunks=[b"hello", surplus],
                chunk_delay=0.2,
                raw_framing=True,
            )
        return Reply(body=request.target)

    upstream.reply_with(reply)
    proxy = make_proxy(upstream.url, max_connections=1, **TIMEOUTS)

    first = _exchange(proxy.url + "/customer/C1", "GET", None)
    upstream.wait_until(lambda: upstream.closed_connections == 1)
    second = _exchange(proxy.url + "/customer/C2", "GET", None)

    assert (first.status, first.body) == (200, b"hello")
    assert (second.status, second.body) == (200, b"/customer/C2")
    assert upstream.connections == 2


TRAILER = b"0\r\nConnection: close\r\nSet-Cookie: session=evil\r\n\r\n"


def test_response_trailer_fields_dropped(
    upstream: StandInUpstream, make_proxy: Callable[..., RunningProxy]
) -> None:
    # Head, body and trailer in one write, so they are parsed together.
    upstream.reply_with(
        Reply(raw=b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n" + TRAILER)
    )
    proxy = make_proxy(upstream.url, **TIMEOUTS)

    outcome = _exchange(proxy.url + "/customer/C1", "GET", None)

    assert (outcome.status, outcome.body) == (200, b"hello")
    assert "set-cookie" not in outcome.headers


def test_trailer_close_ends_pooled_connection(
    upstream: StandInUpstream, make_proxy: Callable[..., RunningProxy]
) -> None:
    def reply(request: RecordedRequest) -> Reply:
        if request.target == b"/customer/C1":
            return Reply(
                headers=[("Transfer-Encoding", "chunked")],
                body=b"5\r\nhello\r\n" + TRAILER,
                raw_framing=True,
            )
        return Reply(body=request.target)

    upstream.reply_with(reply)
    proxy = make_proxy(upstream.url, max_connections=1, **TIMEOUTS)

    first = _exchange(proxy.url + "/customer/C1", "GET", None)
    second = _exchange(proxy.url + "/token/payments")

    assert (first.status, first.body) == (200, b"hello")
    assert (second.status, second.body) == (200, b"/token/payments")
    assert upstream.connections == 2


@pytest.mark.parametrize("length", [3, 9])
def test_response_length_and_chunked_not_aborted(
    upstream: StandInUpstream, make_proxy: Callable[..., RunningProxy], length: int
) -> None:
    # RFC 9112 section 6.3: Transfer-Encoding overrides Content-Length, and an
    # intermediary must remove the Content-Length before forwarding, or treat the
    # message as an error (here: a 502 envelope before the response starts).
    upstream.reply_with(
        Reply(
            raw=b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n" % length
        )
    )
    proxy = make_proxy(upstream.url, **TIMEOUTS)

    outcome = _exchange(proxy.url + "/customer/C1", "GET", None)

    assert outcome.error is None
    assert (outcome.status, outcome.body) in {
        (200, b"hello"),
        (502, errors.UPSTREAM_PROTOCOL_ERROR.body()),
    }


# A dripped stream: each piece must reach the client before the upstream sends the next.

DRIP_PIECES = [b"%02d:" % index + b"x" * 5 for index in range(20)]
DRIP_WAIT = 5.0


def _lockstep(pieces: list[bytes], received: list[threading.Event]) -> Iterator[bytes]:
    """Yield each piece only once the client has received the one before it.

    It runs on the upstream's event loop and blocks it while waiting, which is harmless
    with one connection. A proxy that buffered would make a wait time out.
    """
    for index, piece in enumerate(pieces):
        if index and not received[index - 1].wait(DRIP_WAIT):
            raise TimeoutError(f"piece {index - 1} did not reach the client in {DRIP_WAIT} s")
        yield piece


@pytest.mark.parametrize(
    ("framing", "encoding"),
    [
        pytest.param("chunked", None, id="chunked"),
        pytest.param("length", None, id="content-length"),
        pytest.param("chunked", "gzip", id="gzip"),
    ],
)
def test_drip_reaches_client_piece_by_piece(
    upstream: StandInUpstream, proxy: RunningProxy, framing: str, encoding: str | None
) -> None:
    pieces = DRIP_PIECES
    headers = [("Content-Type", "application/octet-stream")]
    if encoding == "gzip":
        # Independent gzip members concatenated are one valid gzip body (RFC 1952 section 2.2).
        pieces = [gzip.compress(piece) for piece in DRIP_PIECES]
        headers.append(("Content-Encoding", "gzip"))
    if framing == "length":
        headers.append(("Content-Length", str(sum(len(piece) for piece in pieces))))
    received = [threading.Event() for _ in pieces]
    upstream.reply_with(
        Reply(headers=headers, chunks=_lockstep(pieces, received), chunked=framing == "chunked")
    )

    seen: list[bytes] = []
    with (
        httpx.Client(timeout=CLIENT_TIMEOUT) as client,
        client.stream("GET", proxy.url + "/integrations/documentstore/file") as response,
    ):
        for piece in response.iter_raw():
            seen.append(piece)
            received[len(seen) - 1].set()

    assert seen == pieces
    assert response.headers.get("content-encoding") == encoding
    if encoding == "gzip":
        assert gzip.decompress(b"".join(seen)) == b"".join(DRIP_PIECES)
    assert len(upstream.requests) == 1


# Client faults: the client leaves mid-upload, mid-download or before the upstream responds.

DOWNLOAD = b"d" * 100_000
UPLOAD_HEAD = (
    b"POST /integrations/documentstore/file HTTP/1.1\r\nHost: proxy.local\r\n"
    b"Content-Type: application/pdf\r\nContent-Length: 1000000\r\n\r\n"
)
ABORTS = {
    "mid-upload": UPLOAD_HEAD + b"a" * 65536,
    "mid-download": b"GET /drip HTTP/1.1\r\nHost: proxy.local\r\n\r\n",
    "waiting": b"GET /hang HTTP/1.1\r\nHost: proxy.local\r\n\r\n",
}


def _faulty_upstream(request: RecordedRequest) -> Reply:
    """Hang on /hang, stall a large download on /drip, and echo any other target at once."""
    if request.target == b"/hang":
        return Reply(fail="hang")
    if request.target == b"/drip":
        return Reply(body=DOWNLOAD, fail="hang_mid_body", fail_after=1000)
    return Reply(body=request.target)


def _start_abort(port: int, kind: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(ABORTS[kind])
    return sock


def _read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        assert piece, f"connection closed after {data!r}"
        data += piece
    return data


def _get_and_close(port: int, target: str) -> bytes:
    """Send one GET with `Connection: close` and read until the proxy closes.

    The proxy closes its socket before the client sees the end, so an fd count taken
    afterwards does not include this connection.
    """
    request = f"GET {target} HTTP/1.1\r\nHost: proxy.local\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request.encode())
        data = b""
        while piece := sock.recv(65536):
            data += piece
    return data


@pytest.mark.parametrize("kind", list(ABORTS))
def test_client_gone_cancels_upstream(
    upstream: StandInUpstream, make_proxy: Callable[..., RunningProxy], kind: str
) -> None:
    upstream.reply_with(_faulty_upstream)
    proxy = make_proxy(upstream.url, **TIMEOUTS)

    with _start_abort(proxy.port, kind) as sock:
        upstream.wait_until(lambda: upstream.heads == 1)
        if kind == "mid-download":
            assert _read_head(sock).startswith(b"HTTP/1.1 200 ")
    # Within the read timeout, so only a cancelled exchange closes the upstream connection.
    upstream.wait_until(
        lambda: upstream.closed_connections == upstream.connections == 1,
        timeout=READ_TIMEOUT / 2,
    )

    if kind == "mid-upload":
        assert upstream.requests == []
        assert len(upstream.incomplete) == 1
        assert 0 < upstream.incomplete[0].body_size < 1_000_000
    else:
        assert len(upstream.requests) == 1
    assert _get_and_close(proxy.port, "/after").endswith(b"\r\n\r\n/after")


class _LoopProbe:
    """The configured credential, noting the event loop that the proxy runs on."""

    def __init__(self, upstream_url: str) -> None:
        settings = Settings(upstream_url=upstream_url, api_key=KEY, egress_proxy="")
        self._inner = build_credential(settings)
        self.loop: asyncio.AbstractEventLoop | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self._inner.start()

    def task_count(self) -> int:
        """The number of tasks on the proxy's loop, not counting the one that counts."""

        async def count() -> int:
            return len(asyncio.all_tasks()) - 1

        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(count(), self.loop).result(5)


def _heads_reached(upstream: StandInUpstream, count: int) -> Callable[[], bool]:
    return lambda: upstream.heads >= count


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll `predicate` until it is true or `timeout` passes, for state with no event."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.timeout(60)
def test_thousand_aborts_leak_nothing(
    upstream: StandInUpstream, make_proxy: Callable[..., RunningProxy]
) -> None:
    upstream.reply_with(_faulty_upstream)
    probe = _LoopProbe(upstream.url)
    # A small pool: if one aborted exchange kept its connection, a later batch would
    # wait for the pool and fail the upstream wait below.
    proxy = make_proxy(upstream.url, credential=probe, max_connections=10, **TIMEOUTS)
    assert _get_and_close(proxy.port, "/warm-up").endswith(b"/warm-up")
    # Both ends of the pooled upstream connection are sockets of this process, and
    # every client socket is closed by now. So the count covers proxy and upstream.
    fds_before, tasks_before = _fd_count(), probe.task_count()

    kinds = list(ABORTS) * 334
    for start in range(0, 1000, 10):
        batch = kinds[start : start + 10]
        sockets = [_start_abort(proxy.port, kind) for kind in batch]
        upstream.wait_until(_heads_reached(upstream, start + len(batch) + 1))
        for sock, kind in zip(sockets, batch, strict=True):
            if kind == "mid-download":
                _read_head(sock)
        for sock in sockets:
            sock.close()

    # Every aborted exchange closes its upstream connection, well within the read timeout.
    upstream.wait_until(
        lambda: upstream.closed_connections == upstream.connections, timeout=READ_TIMEOUT
    )
    after = _get_and_close(proxy.port, "/after")
    uploads = kinds[:1000].count("mid-upload")

    assert after.endswith(b"\r\n\r\n/after")
    assert len(upstream.incomplete) == uploads
    assert all(request.body_size < 1_000_000 for request in upstream.incomplete)
    assert len(upstream.requests) == 1000 - uploads + 2
    assert _eventually(lambda: _fd_count() == fds_before), (fds_before, _fd_count())
    assert _eventually(lambda: probe.task_count() == tasks_before), (
        tasks_before,
        probe.task_count(),
    )
    with httpx.Client(timeout=CLIENT_TIMEOUT) as client:
        statuses = _concurrently(20, lambda index: client.get(f"{proxy.url}/c{index}").status_code)
    assert statuses == [200] * 20


def _concurrently(count: int, call: Callable[[int], Any]) -> list[Any]:
    """Run `call(0)` to `call(count - 1)` in threads, and return the results in order."""
    results: list[Any] = [None] * count

    def run(index: int) -> None:
        results[index] = call(index)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)
    return results


# Slow clients: each is cut by client_header_timeout or client_body_timeout alone,
# and the other clients are served meanwhile.

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 0.5


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while piece := sock.recv(65536):
        data += piece
    return data


def _read_response(sock: socket.socket) -> bytes:
    """Read one response whose body has a Content-Length."""
    data = _read_head(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.partition(b":")[2])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    while len(body) < length:
        piece = sock.recv(65536)
        assert piece, f"connection closed after {len(body)} of {length} body bytes"
        body += piece
    return head + b"\r\n\r\n" + body


def _trickle_heads(sockets: list[socket.socket], seconds: float) -> None:
    """Send each socket one more header byte every 50 ms, for `seconds`.

    The trickle stops before client_header_timeout, because a byte that meets the
    proxy's close could make the kernel reset the connection and drop the 408 unread.
    """
    rounds = int(seconds / 0.05)
    for _ in range(rounds):
        time.sleep(0.05)  # pacing of the attack, not synchronisation
        for sock in sockets:
            sock.send(b"a")


def test_slowloris_heads_cut_others_served(
    upstream: StandInUpstream, make_proxy: Callable[..., RunningProxy]
) -> None:
    proxy = make_proxy(upstream.url, client_header_timeout=HEADER_TIMEOUT, **TIMEOUTS)
    started = time.monotonic()
    slow = [socket.create_connection(("127.0.0.1", proxy.port), timeout=5) for _ in range(20)]
    for sock in slow:
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: proxy.local\r\nX-Slow: ")
    trickler = threading.Thread(target=_trickle_heads, args=(slow, HEADER_TIMEOUT * 0.6))
    trickler.start()

    served: list[float] = []
    while time.monotonic() - started < HEADER_TIMEOUT * 0.6:
        outcome = _exchange(proxy.url + "/customer", "GET", None)
        assert outcome.status == 200
        served.append(outcome.seconds)
    trickler.join(5)
    responses = [_read_until_closed(sock) for sock in slow]
    elapsed = time.monotonic() - started
    for sock in slow:
        sock.close()

    assert len(served) >= 5
    assert max(served) < 0.5
    assert elapsed < HEADER_TIMEOUT + MARGIN
    for response in responses:
        assert response.startswith(b"HTTP/1.1 408 ")
        body = json.loads(response.partition(b"\r\n\r\n")[2])
        assert body["errors"] == ["ProxyClientTimeout"]
        assert body["values"] == {"upstreamReached": False}
    assert {request.target for request in upstream.requests} == {b"/customer"}


@pytest.mark.parametrize(
    "stalls", [pytest.param(False, id="steady"), pytest.param(True, id="stalls")]
)
def test_trickled_body_bounded_by_pause(
    upstream: StandInUpstream, make_proxy: Callable[..., RunningProxy], stalls: bool
) -> None:
    proxy = make_proxy(upstream.url, client_body_timeout=BODY_TIMEOUT, **TIMEOUTS)
    head = b"POST /token/payments HTTP/1.1\r\nHost: proxy.local\r\nContent-Length: 100\r\n\r\n"
    pieces = [b"%d" % digit * 10 for digit in range(10)]
    sent = pieces[:6] if stalls else pieces

    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(head)
        for piece in sent:
            time.sleep(BODY_TIMEOUT / 3)  # a pause shorter than client_body_timeout
            sock.sendall(piece)
            assert _exchange(proxy.url + "/customer", "GET", None).status == 200
        stalled_at = time.monotonic()
        response = _read_response(sock)
        waited = time.monotonic() - stalled_at

    received = [request for request in upstream.requests if request.method == "POST"]
    if stalls:
        assert response.startswith(b"HTTP/1.1 408 ")
        assert json.loads(response.partition(b"\r\n\r\n")[2])["values"] == {"upstreamReached": True}
        assert waited < BODY_TIMEOUT + MARGIN
        upstream.wait_until(lambda: len(upstream.incomplete) == 1)
        assert received == []
        assert upstream.incomplete[0].body == b"".join(sent)
    else:
        assert response.startswith(b"HTTP/1.1 200 ")
        assert [request.body for request in received] == [b"".join(pieces)]


# Bodies intact under concurrency, in both directions.

BODY_SIZES = [0, 1, 100, 4096, 65536, 300_000]
# An empty response with Content-Length: 0 breaks the connection it came on (see
# test_empty_response_keeps_connection), so the replies here are never empty.
REPLY_SIZES = BODY_SIZES[1:]


def _reply_bytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)  # noqa: S311 - test data, not a secret


def _integrity_upstream(request: RecordedRequest) -> Reply:
    """Reply with a body made from the request's id, and with its SHA-256 in a header."""
    seed = int(request.header("x-test-id")[0])
    size = int(request.header("x-reply-size")[0])
    body = _reply_bytes(seed, size)
    headers = [("Content-Type", "application/octet-stream")]
    if request.header("x-reply-gzip") == ["1"]:
        body = gzip.compress(body, mtime=0)
        headers.append(("Content-Encoding", "gzip"))
    headers.append(("X-Reply-SHA256", hashlib.sha256(body).hexdigest()))
    pieces = [body[index : index + 16384] for index in range(0, len(body), 16384)]
    chunked = request.header("x-reply-chunked") == ["1"]
    return Reply(headers=headers, chunks=pieces, chunked=chunked)


async def _pieces(body: bytes) -> Any:
    for index in range(0, len(body), 50_000):
        yield body[index : index + 50_000]


async def _integrity_run(url: str, total: int, workers: int) -> dict[int, tuple[str, str, str]]:
    """Send `total` requests from `workers` tasks.

    Returns, by request id, the SHA-256 of the body sent, the one the upstream declared
    for its reply, and the one of the reply received.
    """
    results: dict[int, tuple[str, str, str]] = {}
    ids = iter(range(total))
    limits = httpx.Limits(max_connections=workers)

    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT, limits=limits) as client:

        async def work() -> None:
            for test_id in ids:
                plan = random.Random(test_id)  # noqa: S311 - test data, not a secret
                body = plan.randbytes(plan.choice(BODY_SIZES)) if test_id % 5 else b""
                headers = {
                    "x-test-id": str(test_id),
                    "x-reply-size": str(plan.choice(REPLY_SIZES)),
                    "x-reply-chunked": str(plan.randint(0, 1)),
                    "x-reply-gzip": "1" if test_id % 7 == 0 else "0",
                }
                content = _pieces(body) if plan.randint(0, 1) else body
                method = "POST" if body else "GET"
                digest = hashlib.sha256()
                async with client.stream(
                    method, f"{url}/token/payments/{test_id}", content=content, headers=headers
                ) as response:
                    async for piece in response.aiter_raw():
                        digest.update(piece)
                results[test_id] = (
                    hashlib.sha256(body).hexdigest(),
                    response.headers["x-reply-sha256"],
                    digest.hexdigest(),
                )

        await asyncio.gather(*(work() for _ in range(workers)))
    return results


def test_bodies_intact_under_concurrency(
    upstream: StandInUpstream, make_proxy: Callable[..., RunningProxy]
) -> None:
    upstream.reply_with(_integrity_upstream)
    proxy = make_proxy(upstream.url, max_connections=32, **TIMEOUTS)

    results = asyncio.run(_integrity_run(proxy.url, total=300, workers=48))

    received = {int(request.header("x-test-id")[0]): request for request in upstream.requests}
    assert len(upstream.requests) == 300
    assert sorted(received) == sorted(results) == list(range(300))
    for test_id, (sent, declared, delivered) in results.items():
        assert received[test_id].body_sha256 == sent, f"request {test_id}: upload changed"
        assert delivered == declared, f"request {test_id}: download changed"


class _EarlyAnswer:
    """An upstream that sends 413 after the request head and never reads the body."""

    RESPONSE = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 9\r\n\r\ntoo large"

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> _EarlyAnswer:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.done.set()
        self.listener.close()
        self.thread.join(5)

    def _serve(self) -> None:
        connection, _ = self.listener.accept()
        with connection:
            head = b""
            while b"\r\n\r\n" not in head:
                head += connection.recv(65536)
            connection.sendall(self.RESPONSE)
            self.done.wait(20)


def test_early_response_ends_stalled_upload(make_proxy: Callable[..., RunningProxy]) -> None:
    # The upstream stops reading once it has responded, so the upload stalls. The
    # client must get that response at once, not a 504 after write_timeout.
    write_timeout = 3.0
    with _EarlyAnswer() as upstream:
        proxy = make_proxy(
            upstream.url, **{**TIMEOUTS, "write_timeout": write_timeout}, max_body_size=0
        )
        outcome = _exchange(proxy.url + "/token/payments", content=b"x" * (64 * 1024 * 1024))

    assert outcome.error is None
    assert (outcome.status, outcome.body) == (413, b"too large")
    assert outcome.seconds < write_timeout


def test_body_timeout_closes_connection(
    upstream: StandInUpstream, make_proxy: Callable[..., RunningProxy]
) -> None:
    # RFC 9110 section 15.5.9: a 408 means the server decided to close the connection.
    proxy = make_proxy(
        upstream.url,
        client_header_timeout=HEADER_TIMEOUT,
        client_body_timeout=BODY_TIMEOUT,
        **TIMEOUTS,
    )
    head = b"POST /token/payments HTTP/1.1\r\nHost: proxy.local\r\nContent-Length: 100\r\n\r\n"
    bound = MARGIN

    with socket.create_connection(("127.0.0.1", proxy.port), timeout=bound) as sock:
        sock.sendall(head + b"a" * 10)
        response = _read_response(sock)
        sock.sendall(b"a")  # the rest of the declared body, one byte late
        try:
            rest = sock.recv(65536)
        except ConnectionResetError:
            rest = b""  # closed: the late byte met the closed socket
        except TimeoutError:
            rest = None

    assert response.startswith(b"HTTP/1.1 408 ")
    assert rest == b"", f"connection still open {bound} s after the 408"


def test_empty_response_keeps_connection(
    upstream: StandInUpstream, make_proxy: Callable[..., RunningProxy], caplog: Any
) -> None:
    # PUT /mail/{code}/sent has no body, and an upstream may respond to it with none.
    upstream.reply_with(Reply(body=b""))
    proxy = make_proxy(upstream.url, **TIMEOUTS)
    request = b"PUT /mail/M1/sent HTTP/1.1\r\nHost: proxy.local\r\nContent-Length: 0\r\n\r\n"

    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(request)
        first = _read_response(sock)
        sock.sendall(request)
        try:
            second = _read_response(sock)
        except (AssertionError, ConnectionError) as exc:
            second = repr(exc).encode()

    assert first.startswith(b"HTTP/1.1 200 ")
    assert second.startswith(b"HTTP/1.1 200 ")
    assert "without completing response" not in caplog.text
