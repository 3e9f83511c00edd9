"""Tests of the stand-in upstream fixture itself, with raw sockets and httpx on loopback."""

from __future__ import annotations

import hashlib
import resource
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import trustme

from tests.upstream import RecordedRequest, Reply, StandInUpstream

SOCKET_TIMEOUT = 5.0
MIB = 1024 * 1024
GIB = 1024 * MIB


def _client(**options: Any) -> httpx.Client:
    """Create an httpx client that ignores proxy variables, so requests stay on loopback."""
    return httpx.Client(trust_env=False, **options)


def _connect(upstream: StandInUpstream) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", upstream.port), timeout=SOCKET_TIMEOUT)
    sock.settimeout(SOCKET_TIMEOUT)
    return sock


def _read_until_closed(sock: socket.socket) -> tuple[bytes, BaseException | None]:
    """Read until the peer closes, and return the bytes and the error that ended reading, if any."""
    received = bytearray()
    while True:
        try:
            data = sock.recv(65536)
        except OSError as error:
            return bytes(received), error
        if not data:
            return bytes(received), None
        received += data


def _read_head(sock: socket.socket) -> bytes:
    """Read one response head, byte by byte so that nothing after it is consumed."""
    head = bytearray()
    while not head.endswith(b"\r\n\r\n"):
        data = sock.recv(1)
        if not data:
            raise ConnectionError(f"connection closed inside a response head: {bytes(head)!r}")
        head += data
    return bytes(head)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        piece = sock.recv(size - len(data))
        if not piece:
            raise ConnectionError(f"connection closed after {len(data)} of {size} bytes")
        data += piece
    return bytes(data)


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            return int(value)
    raise AssertionError(f"no Content-Length in {head!r}")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _pieces(total: int, size: int = MIB) -> Iterator[bytes]:
    piece = b"n" * size
    for _ in range(total // size):
        yield piece


@pytest.mark.timeout(10)
def test_records_repeated_headers_with_case() -> None:
    request = (
        b"GET /customer?page=1 HTTP/1.1\r\n"
        b"Host: nexus.test\r\n"
        b"X-Trace: first\r\n"
        b"x-trace: second\r\n"
        b"X-TRACE:third  \r\n"
        b"\r\n"
    )
    with StandInUpstream() as upstream, _connect(upstream) as sock:
        sock.sendall(request)
        head = _read_head(sock)
        body = _read_exactly(sock, _content_length(head))
        [recorded] = upstream.wait_for_requests(1)

    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"content-type: application/json\r\n" in head
    assert body == b'{"message":"Successfully processed your request","errors":null,"values":{}}'
    assert recorded.method == "GET"
    assert recorded.target == b"/customer?page=1"
    assert recorded.http_version == "1.1"
    assert recorded.headers == [
        (b"Host", b"nexus.test"),
        (b"X-Trace", b"first"),
        (b"x-trace", b"second"),
        (b"X-TRACE", b"third"),
    ]
    assert recorded.header("x-trace") == ["first", "second", "third"]
    assert recorded.header("Missing") == []
    assert recorded.raw_head == request
    assert recorded.body == b""
    assert recorded.body_size == 0
    assert recorded.chunked is False


@pytest.mark.timeout(10)
def test_records_chunked_upload() -> None:
    request = (
        b"POST /accounts HTTP/1.1\r\n"
        b"Host: nexus.test\r\n"
        b"Transfer-Encoding: chunked\r\n"
        b"\r\n"
        b"5;name=value\r\nhello\r\n"
        b"1\r\n \r\n"
        b"A\r\n0123456789\r\n"
        b"0\r\n"
        b"X-Checksum: abc\r\n"
        b"\r\n"
    )
    with StandInUpstream() as upstream, _connect(upstream) as sock:
        sock.sendall(request)
        head = _read_head(sock)
        _read_exactly(sock, _content_length(head))
        [recorded] = upstream.wait_for_requests(1)

    expected = b"hello 0123456789"
    assert recorded.chunked is True
    assert recorded.body == expected
    assert recorded.body_size == len(expected)
    assert recorded.body_sha256 == hashlib.sha256(expected).hexdigest()
    assert recorded.trailers == [(b"X-Checksum", b"abc")]
    assert recorded.header("transfer-encoding") == ["chunked"]
    assert upstream.body_started.is_set()


@pytest.mark.timeout(10)
def test_httpx_iterator_upload_arrives_chunked() -> None:
    with StandInUpstream() as upstream, _client() as client:
        response = client.post(upstream.url + "/upload", content=iter([b"ab", b"", b"cd"]))
        [recorded] = upstream.wait_for_requests(1)

    assert response.status_code == 200
    assert recorded.chunked is True
    assert recorded.body == b"abcd"


@pytest.mark.timeout(10)
def test_keep_alive_serves_requests_on_one_connection() -> None:
    with StandInUpstream() as upstream, _client() as client:
        for page in range(3):
            client.get(f"{upstream.url}/customer?page={page}").raise_for_status()
        recorded = upstream.wait_for_requests(3)

    assert [request.target for request in recorded] == [
        b"/customer?page=0",
        b"/customer?page=1",
        b"/customer?page=2",
    ]
    assert upstream.connections == 1


@pytest.mark.timeout(10)
def test_connection_close_request_ends_connection() -> None:
    with StandInUpstream() as upstream, _connect(upstream) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        received, error = _read_until_closed(sock)
        upstream.wait_until(lambda: upstream.closed_connections == 1)

    assert error is None
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")


@pytest.mark.timeout(10)
def test_expect_continue_sent_before_body() -> None:
    head = b"PUT /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
    with StandInUpstream() as upstream, _connect(upstream) as sock:
        sock.sendall(head)
        interim = _read_head(sock)
        sock.sendall(b"data")
        final = _read_head(sock)
        [recorded] = upstream.wait_for_requests(1)

    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert final.startswith(b"HTTP/1.1 200 OK\r\n")
    assert recorded.body == b"data"


@pytest.mark.timeout(10)
def test_body_started_before_body_complete() -> None:
    with StandInUpstream() as upstream, _connect(upstream) as sock:
        sock.sendall(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n12345")

        assert upstream.body_started.wait(SOCKET_TIMEOUT)
        assert upstream.requests == []

        sock.sendall(b"67890")
        [recorded] = upstream.wait_for_requests(1)

    assert recorded.body == b"1234567890"


def _echo_target(request: RecordedRequest) -> Reply:
    return Reply(headers=[("content-type", "text/plain")], body=request.target)


@pytest.mark.timeout(10)
def test_handler_echoes_and_reply_with_switches() -> None:
    def echo(request: RecordedRequest) -> Reply:
        return Reply(headers=[("x-target", request.target.decode())], body=request.body)

    with StandInUpstream(echo) as upstream, _client() as client:
        echoed = client.post(upstream.url + "/echo", content=b"payload")
        upstream.reply_with(Reply(status=404, body=b"{}"))
        missing = client.get(upstream.url + "/gone")

    assert echoed.headers["x-target"] == "/echo"
    assert echoed.content == b"payload"
    assert missing.status_code == 404
    assert missing.content == b"{}"


@pytest.mark.timeout(10)
def test_failing_handler_sends_500() -> None:
    def broken(request: RecordedRequest) -> Reply:
        raise RuntimeError("handler bug")

    with StandInUpstream(broken) as upstream, _client() as client:
        response = client.get(upstream.url)

    assert response.status_code == 500
    assert "handler bug" in response.text


@pytest.mark.timeout(10)
def test_head_and_204_send_no_body() -> None:
    with StandInUpstream(Reply(body=b"0123456789")) as upstream, _connect(upstream) as sock:
        sock.sendall(b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n")
        head_reply = _read_head(sock)
        upstream.reply_with(Reply(status=204, headers=[], body=b""))
        sock.sendall(b"DELETE /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        rest, error = _read_until_closed(sock)

    assert b"Content-Length: 10\r\n" in head_reply
    assert error is None
    assert rest == b"HTTP/1.1 204 No Content\r\n\r\n"


@pytest.mark.timeout(10)
def test_informational_responses_come_first() -> None:
    reply = Reply(informational=[103], body=b"ok", headers=[])
    with StandInUpstream(reply) as upstream, _connect(upstream) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        received, _ = _read_until_closed(sock)

    assert received == (
        b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )


@pytest.mark.timeout(10)
def test_close_before_response() -> None:
    with StandInUpstream(Reply(fail="close_before_response")) as upstream:
        with _connect(upstream) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            received, error = _read_until_closed(sock)
        with _client() as client, pytest.raises(httpx.RemoteProtocolError):
            client.get(upstream.url)

    assert received == b""
    assert error is None


@pytest.mark.timeout(10)
def test_reset_before_response() -> None:
    with StandInUpstream(Reply(fail="reset_before_response")) as upstream:
        with _connect(upstream) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            received, error = _read_until_closed(sock)
        with _client() as client, pytest.raises(httpx.ReadError):
            client.get(upstream.url)

    assert received == b""
    assert isinstance(error, ConnectionResetError)


@pytest.mark.timeout(10)
def test_hang_sends_nothing_until_stop() -> None:
    upstream = StandInUpstream(Reply(fail="hang"))
    with upstream, _connect(upstream) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        upstream.wait_for_requests(1)
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(1)
        with _client(timeout=0.3) as client, pytest.raises(httpx.ReadTimeout):
            client.get(upstream.url)

        started = time.monotonic()
        upstream.__exit__(None, None, None)
        stop_seconds = time.monotonic() - started
        sock.settimeout(SOCKET_TIMEOUT)
        received, _ = _read_until_closed(sock)

    assert stop_seconds < 1.0
    assert received == b""


@pytest.mark.timeout(10)
@pytest.mark.parametrize("chunked", [False, True])
def test_close_mid_body(chunked: bool) -> None:
    reply = Reply(body=b"x" * 1000, chunked=chunked, fail="close_mid_body", fail_after=100)
    with StandInUpstream(reply) as upstream:
        with _connect(upstream) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            head = _read_head(sock)
            rest, error = _read_until_closed(sock)
        with _client() as client, pytest.raises(httpx.RemoteProtocolError):
            client.get(upstream.url)

    assert error is None
    if chunked:
        assert b"Transfer-Encoding: chunked\r\n" in head
        assert rest == b"64\r\n" + b"x" * 100 + b"\r\n"
    else:
        assert b"Content-Length: 1000\r\n" in head
        assert rest == b"x" * 100


@pytest.mark.timeout(10)
def test_reset_mid_body() -> None:
    reply = Reply(chunks=[b"a" * 60, b"b" * 60], fail="reset_mid_body", fail_after=100)
    with StandInUpstream(reply) as upstream:
        with _connect(upstream) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            head = _read_head(sock)
            rest, error = _read_until_closed(sock)
        with _client() as client, pytest.raises(httpx.ReadError):
            client.get(upstream.url)

    assert b"Content-Length: 120\r\n" in head
    assert rest == b"a" * 60 + b"b" * 40
    assert isinstance(error, ConnectionResetError)


@pytest.mark.timeout(10)
def test_invalid_response_is_not_http() -> None:
    with StandInUpstream(Reply(fail="invalid")) as upstream:
        with _connect(upstream) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            received, _ = _read_until_closed(sock)
        with _client() as client, pytest.raises(httpx.RemoteProtocolError):
            client.get(upstream.url)

    assert received
    assert not received.startswith(b"HTTP/")


@pytest.mark.timeout(10)
def test_raw_reply_sent_verbatim() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Odd:  spaced \r\n\r\nhello"
    with StandInUpstream(Reply(raw=raw)) as upstream, _connect(upstream) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        received, error = _read_until_closed(sock)

    assert error is None
    assert received == raw


@pytest.mark.timeout(10)
def test_raw_framing_without_length_closes() -> None:
    reply = Reply(headers=[("content-type", "text/plain")], body=b"until close", raw_framing=True)
    with StandInUpstream(reply) as upstream, _client() as client:
        response = client.get(upstream.url)

    assert "content-length" not in response.headers
    assert response.content == b"until close"


@pytest.mark.timeout(10)
def test_delays_pace_head_and_chunks() -> None:
    reply = Reply(chunks=[b"one", b"two"], chunked=True, head_delay=0.2, chunk_delay=0.2)
    with StandInUpstream(reply) as upstream, _client() as client:
        started = time.monotonic()
        with client.stream("GET", upstream.url) as response:
            head_seconds = time.monotonic() - started
            pieces = list(response.iter_raw())
        total_seconds = time.monotonic() - started

    assert head_seconds >= 0.2
    assert total_seconds >= 0.4
    assert pieces == [b"one", b"two"]


def _reply_by_target(request: RecordedRequest) -> Reply:
    if request.target == b"/hang":
        return Reply(fail="hang")
    if request.target == b"/big":
        return Reply(chunks=_pieces(GIB), chunked=True)
    return Reply()


@pytest.mark.timeout(10)
def test_stop_is_prompt_with_clients_attached() -> None:
    upstream = StandInUpstream(_reply_by_target)
    with upstream, _connect(upstream) as hung, _connect(upstream) as idle:
        with _connect(upstream) as downloading, _connect(upstream) as uploading:
            hung.sendall(b"GET /hang HTTP/1.1\r\nHost: a\r\n\r\n")
            downloading.sendall(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
            _read_head(downloading)  # then stop reading, so the server blocks on a full buffer
            uploading.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\npart")
            upstream.wait_for_requests(2)
            assert upstream.body_started.wait(SOCKET_TIMEOUT)

            started = time.monotonic()
            upstream.__exit__(None, None, None)
            stop_seconds = time.monotonic() - started

        for sock in (hung, idle):
            received, _ = _read_until_closed(sock)
            assert received == b""

    assert stop_seconds < 1.0
    assert upstream.connections == 4
    assert upstream.closed_connections == 4
    assert len(upstream.incomplete) == 1
    assert upstream.incomplete[0].body == b"part"


@pytest.mark.timeout(10)
def test_pipelined_requests_served_in_order() -> None:
    with StandInUpstream(_echo_target) as upstream, _connect(upstream) as sock:
        sock.sendall(
            b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /second HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        received, error = _read_until_closed(sock)

    assert error is None
    assert received.count(b"HTTP/1.1 200 OK\r\n") == 2
    assert received.endswith(b"/second")
    assert received.index(b"/first") < received.index(b"/second")


@pytest.mark.timeout(30)
def test_one_gib_generator_download_streams() -> None:
    peak_before = _peak_rss_bytes()
    digest = hashlib.sha256()
    expected = hashlib.sha256()
    for piece in _pieces(GIB):
        expected.update(piece)

    reply = Reply(chunks=_pieces(GIB), chunked=True)
    with (
        StandInUpstream(reply) as upstream,
        _client() as client,
        client.stream("GET", upstream.url) as response,
    ):
        for data in response.iter_raw(MIB):
            digest.update(data)

    assert digest.hexdigest() == expected.hexdigest()
    assert _peak_rss_bytes() - peak_before < 256 * MIB


@pytest.mark.timeout(30)
def test_one_gib_upload_without_keep_body() -> None:
    peak_before = _peak_rss_bytes()
    expected = hashlib.sha256()
    for piece in _pieces(GIB):
        expected.update(piece)

    with StandInUpstream(Reply(keep_body=False)) as upstream, _client() as client:
        response = client.post(upstream.url, content=_pieces(GIB))
        [recorded] = upstream.wait_for_requests(1)

    assert response.status_code == 200
    assert recorded.body == b""
    assert recorded.body_size == GIB
    assert recorded.body_sha256 == expected.hexdigest()
    assert _peak_rss_bytes() - peak_before < 256 * MIB


@pytest.mark.timeout(10)
def test_malformed_request_gets_400() -> None:
    with StandInUpstream() as upstream, _connect(upstream) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 2\r\n\r\n")
        received, _ = _read_until_closed(sock)

    assert received.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert upstream.requests == []


@pytest.mark.timeout(10)
def test_tls_upstream_serves_https() -> None:
    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)

    with StandInUpstream(ssl_context=server_context) as upstream:
        with _client(verify=client_context) as client:
            response = client.get(upstream.url + "/secure")
        [recorded] = upstream.wait_for_requests(1)

    assert upstream.url.startswith("https://localhost:")
    assert response.status_code == 200
    assert recorded.target == b"/secure"


@pytest.mark.timeout(10)
def test_wait_for_requests_times_out() -> None:
    with StandInUpstream() as upstream, pytest.raises(TimeoutError):
        upstream.wait_for_requests(1, timeout=0.1)


@pytest.mark.timeout(10)
def test_rejects_non_loopback_host() -> None:
    with pytest.raises(ValueError, match="loopback"):
        StandInUpstream(host="0.0.0.0")


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"fail": "explode"}, "invalid fail mode"),
        ({"chunks": iter([b"a"])}, "Content-Length of a `chunks` iterator is unknown"),
        ({"body": b"abc", "fail": "close_mid_body", "fail_after": 3}, "invalid fail_after"),
        ({"informational": [200]}, "invalid informational status"),
    ],
)
def test_reply_rejects_unsendable_fields(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Reply(**fields)  # type: ignore[arg-type]


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.timeout(10)
@pytest.mark.skipif(not _has_ipv6_loopback(), reason="::1 is not available on this machine")
def test_serves_ipv6_loopback() -> None:
    with StandInUpstream(host="::1") as upstream, _client() as client:
        response = client.get(upstream.url)

    assert upstream.url.startswith("http://[::1]:")
    assert response.status_code == 200


@pytest.mark.timeout(10)
def test_fixture_thread_ends_after_stop() -> None:
    before = set(threading.enumerate())
    with StandInUpstream():
        pass
    assert set(threading.enumerate()) <= before
