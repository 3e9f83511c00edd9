"""The forwarding contract, through real sockets: uvicorn serving the proxy, a raw upstream."""

from __future__ import annotations

import gzip
import json
import socket
import time
from collections.abc import Callable

import httpx
import pytest

from tests.conftest import KEY, RunningProxy, raw_exchange
from tests.upstream import RecordedRequest, Reply, StandInUpstream

pytestmark = pytest.mark.timeout(20)


def _get(proxy: RunningProxy, target: str, *extra_headers: str) -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: proxy.local", *extra_headers, "", ""]
    return raw_exchange(proxy.port, "\r\n".join(lines).encode())


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def _headers(response: bytes) -> list[tuple[bytes, bytes]]:
    head = response.split(b"\r\n\r\n", 1)[0]
    pairs = []
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        pairs.append((name.strip().lower(), value.strip()))
    return pairs


def _values(response: bytes, name: bytes) -> list[bytes]:
    return [value for key, value in _headers(response) if key == name]


def _body(response: bytes) -> bytes:
    return response.split(b"\r\n\r\n", 1)[1]


@pytest.mark.parametrize(
    "target",
    [
        pytest.param("/customer?page=1&limit=10&status=ACTIVE&email=a%2Bb%40x.com", id="encoded"),
        pytest.param("/customer?email=a+b@x.com", id="raw-plus-and-at"),
        pytest.param("/transaction?status=BLOCKED|PAYOUTONHOLD", id="raw-pipe"),
        pytest.param("/transaction?status=BLOCKED%7CPAYOUTONHOLD", id="encoded-pipe"),
        pytest.param("/integrations/documentstore/file?filePath=folder/name.pdf", id="slash-query"),
        pytest.param("/customer/bankAccounts", id="mixed-case"),
        pytest.param("/Customer/BANKACCOUNTS", id="upper-case"),
        pytest.param("/x%2Fy", id="encoded-slash"),
        pytest.param("/a/../b", id="dot-dot-segment"),
        pytest.param("/a/./b", id="dot-segment"),
        pytest.param("/a//b", id="double-slash"),
        pytest.param("/%41%42", id="encoded-unreserved"),
        pytest.param("/{x}^`", id="raw-brackets"),
        pytest.param("/accounts/XLM-GBXYZ?x=%20&y=%zz", id="odd-escapes"),
        pytest.param("/customer?", id="empty-query"),
    ],
)
def test_forward_keeps_target_bytes(
    proxy: RunningProxy, upstream: StandInUpstream, target: str
) -> None:
    response = _get(proxy, target)

    assert _status(response) == 200
    assert upstream.requests[-1].target == target.encode()


def test_forward_cannot_change_upstream_host(
    proxy: RunningProxy, upstream: StandInUpstream
) -> None:
    response = _get(proxy, "//other.host/x")

    assert _status(response) == 200
    assert upstream.requests[-1].target == b"//other.host/x"
    assert upstream.requests[-1].header("host") == [f"127.0.0.1:{upstream.port}"]


def test_forward_appends_path_to_base(
    upstream: StandInUpstream, make_proxy: Callable[..., RunningProxy]
) -> None:
    proxy = make_proxy(upstream.url + "/base/")

    _get(proxy, "/x?y=1")
    _get(proxy, "//x")

    assert [request.target for request in upstream.requests] == [b"/base/x?y=1", b"/base//x"]


@pytest.mark.parametrize(
    "client_headers",
    [
        pytest.param([], id="none"),
        pytest.param(["Authorization: Bearer dummy"], id="dummy"),
        pytest.param(["Authorization: Bearer "], id="empty-bearer"),
        pytest.param(["Authorization: Basic Zm9vOmJhcg=="], id="basic"),
        pytest.param(["Authorization: Bearer a", "authorization: Bearer b"], id="two"),
    ],
)
def test_forward_sets_exactly_one_authorization(
    proxy: RunningProxy, upstream: StandInUpstream, client_headers: list[str]
) -> None:
    _get(proxy, "/customer", *client_headers)

    assert upstream.requests[-1].header("authorization") == [f"Bearer {KEY}"]


def test_forward_sends_authorization_last(proxy: RunningProxy, upstream: StandInUpstream) -> None:
    _get(proxy, "/customer", "Authorization: Bearer dummy", "X-After: 1")

    assert upstream.requests[-1].headers[-1][0].lower() == b"authorization"


@pytest.mark.parametrize(
    ("iso8601", "client_headers", "expected"),
    [
        pytest.param(True, [], ["true"], id="added"),
        pytest.param(True, ["request_iso8601: false"], ["true"], id="replaced"),
        pytest.param(True, ["request_iso8601: a", "request_iso8601: b"], ["true"], id="repeated"),
        pytest.param(False, [], [], id="off-absent"),
        pytest.param(False, ["request_iso8601: false"], ["false"], id="off-kept"),
    ],
)
def test_forward_iso8601_header(
    upstream: StandInUpstream,
    make_proxy: Callable[..., RunningProxy],
    iso8601: bool,
    client_headers: list[str],
    expected: list[str],
) -> None:
    proxy = make_proxy(upstream.url, iso8601=iso8601)

    _get(proxy, "/customer", *client_headers)

    assert upstream.requests[-1].header("request_iso8601") == expected


@pytest.mark.parametrize(
    ("client_headers", "expected"),
    [
        pytest.param([], ["1.2"], id="added"),
        pytest.param(["api_version: 1.1"], ["1.1"], id="client-wins"),
        pytest.param(["API_VERSION: 1.0"], ["1.0"], id="client-wins-any-case"),
    ],
)
def test_forward_default_headers_only_when_absent(
    proxy: RunningProxy, upstream: StandInUpstream, client_headers: list[str], expected: list[str]
) -> None:
    _get(proxy, "/customer", *client_headers)

    assert upstream.requests[-1].header("api_version") == expected


def test_forward_configured_default_headers(
    upstream: StandInUpstream, make_proxy: Callable[..., RunningProxy]
) -> None:
    proxy = make_proxy(upstream.url, default_headers={"api_version": "1.1", "X-Team": "ops"})

    _get(proxy, "/customer")

    assert upstream.requests[-1].header("api_version") == ["1.1"]
    assert upstream.requests[-1].header("x-team") == ["ops"]


@pytest.mark.parametrize(
    "header",
    [
        pytest.param("Connection: keep-alive", id="connection"),
        pytest.param("Keep-Alive: timeout=5", id="keep-alive"),
        pytest.param("Proxy-Authorization: Basic eDp5", id="proxy-authorization"),
        pytest.param("Proxy-Connection: keep-alive", id="proxy-connection"),
        pytest.param("TE: trailers", id="te"),
        pytest.param("Trailer: X-Checksum", id="trailer"),
        pytest.param("Upgrade: websocket", id="upgrade"),
    ],
)
def test_forward_drops_hop_by_hop_request_header(
    proxy: RunningProxy, upstream: StandInUpstream, header: str
) -> None:
    name = header.split(":")[0]

    _get(proxy, "/customer", header)

    assert upstream.requests[-1].header(name) == []


def test_forward_drops_headers_named_by_connection(
    proxy: RunningProxy, upstream: StandInUpstream
) -> None:
    _get(proxy, "/customer", "Connection: X-Hop, x-other", "X-Hop: 1", "X-Other: 2", "X-Kept: 3")

    assert upstream.requests[-1].header("x-hop") == []
    assert upstream.requests[-1].header("x-other") == []
    assert upstream.requests[-1].header("x-kept") == ["3"]


def test_forward_keeps_other_request_headers(
    proxy: RunningProxy, upstream: StandInUpstream
) -> None:
    _get(
        proxy,
        "/customer",
        "X-Repeat: 1",
        "customer_ip_address: 203.0.113.9",
        "X-Repeat: 2",
        "X-Forwarded-For: 198.51.100.1",
        "Accept: application/json",
    )

    request = upstream.requests[-1]
    assert request.header("x-repeat") == ["1", "2"]
    assert request.header("customer_ip_address") == ["203.0.113.9"]
    assert request.header("x-forwarded-for") == ["198.51.100.1"]
    assert request.header("accept") == ["application/json"]


def test_forward_adds_nothing_unasked(proxy: RunningProxy, upstream: StandInUpstream) -> None:
    _get(proxy, "/customer")

    names = sorted(name.lower().decode() for name, _ in upstream.requests[-1].headers)
    assert names == ["api_version", "authorization", "host", "request_iso8601", "x-request-id"]


@pytest.mark.parametrize(
    ("method", "body"),
    [
        pytest.param("GET", b"", id="get"),
        pytest.param("POST", b'{"amount": 14729.80374332}', id="post"),
        pytest.param("PUT", b"", id="put-empty"),
        pytest.param("PATCH", b"[1]", id="patch"),
        pytest.param("DELETE", b'{"bankAccounts": ["NL01"]}', id="delete-with-body"),
        pytest.param("OPTIONS", b"", id="options"),
        pytest.param("PROPFIND", b"", id="extension-method"),
    ],
)
def test_forward_every_method(
    proxy: RunningProxy, upstream: StandInUpstream, method: str, body: bytes
) -> None:
    head = f"{method} /customer HTTP/1.1\r\nHost: p\r\n"
    if body:
        head += f"Content-Length: {len(body)}\r\n"

    response = raw_exchange(proxy.port, head.encode() + b"\r\n" + body)

    request = upstream.requests[-1]
    assert _status(response) == 200
    assert request.method == method
    assert request.body == body
    assert request.chunked is False
    # Without a body, methods that define one get "Content-Length: 0" (RFC 9110
    # section 8.6), and the others no framing header at all.
    empty = [] if method in ("GET", "HEAD", "OPTIONS") else ["0"]
    assert request.header("content-length") == ([str(len(body))] if body else empty)


def test_forward_chunked_upload(proxy: RunningProxy, upstream: StandInUpstream) -> None:
    pieces = [b'{"a":', b"1", b"}"]

    response = httpx.post(proxy.url + "/token/payments", content=iter(pieces))

    assert response.status_code == 200
    assert upstream.requests[-1].chunked is True
    assert upstream.requests[-1].body == b"".join(pieces)


def test_forward_expect_continue(proxy: RunningProxy, upstream: StandInUpstream) -> None:
    body = b'{"x": 1}'
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(
            b"POST /customer HTTP/1.1\r\nHost: p\r\nExpect: 100-continue\r\n"
            b"Content-Length: 8\r\n\r\n"
        )
        interim = sock.recv(100)
        sock.sendall(body)
        final = sock.recv(4096)

    assert interim.startswith(b"HTTP/1.1 100")
    assert final.startswith(b"HTTP/1.1 200")
    assert upstream.requests[-1].body == body


@pytest.mark.parametrize(
    "status", [pytest.param(s, id=str(s)) for s in (200, 201, 400, 401, 404, 409, 500, 503)]
)
def test_response_status_and_body_unchanged(
    proxy: RunningProxy, upstream: StandInUpstream, status: int
) -> None:
    body = b'{"message":"Could not parse abc","errors":["InvalidQueryParameter"],"values":null}'
    upstream.reply_with(Reply(status=status, body=body))

    response = _get(proxy, "/customer?status=abc")

    assert _status(response) == status
    assert _body(response) == body


def test_response_keeps_repeated_headers(proxy: RunningProxy, upstream: StandInUpstream) -> None:
    upstream.reply_with(
        Reply(headers=[("Set-Cookie", "a=1"), ("X-Trace", "t"), ("Set-Cookie", "b=2")])
    )

    response = _get(proxy, "/customer")

    assert _values(response, b"set-cookie") == [b"a=1", b"b=2"]
    assert _values(response, b"x-trace") == [b"t"]


def test_response_has_one_server_and_date(proxy: RunningProxy, upstream: StandInUpstream) -> None:
    upstream.reply_with(
        Reply(headers=[("Server", "Kestrel"), ("Date", "Fri, 04 Dec 2026 10:00:00 GMT")])
    )

    response = _get(proxy, "/customer")

    assert _values(response, b"server") == [b"Kestrel"]
    assert _values(response, b"date") == [b"Fri, 04 Dec 2026 10:00:00 GMT"]


def test_response_drops_hop_by_hop(proxy: RunningProxy, upstream: StandInUpstream) -> None:
    upstream.reply_with(
        Reply(
            headers=[
                ("Connection", "X-Hop"),
                ("X-Hop", "1"),
                ("Keep-Alive", "timeout=5"),
                ("Upgrade", "h2c"),
                ("X-Kept", "2"),
            ]
        )
    )

    response = _get(proxy, "/customer")

    names = {name for name, _ in _headers(response)}
    assert names.isdisjoint({b"x-hop", b"keep-alive", b"upgrade"})
    assert _values(response, b"x-kept") == [b"2"]


def test_response_keeps_compressed_body(proxy: RunningProxy, upstream: StandInUpstream) -> None:
    compressed = gzip.compress(b'{"values": [' + b"1," * 5000 + b"1]}")
    upstream.reply_with(Reply(headers=[("Content-Encoding", "gzip")], body=compressed))

    response = _get(proxy, "/customer", "Accept-Encoding: gzip")

    assert _values(response, b"content-encoding") == [b"gzip"]
    assert _body(response) == compressed


def test_response_chunked_body_streams_through(
    proxy: RunningProxy, upstream: StandInUpstream
) -> None:
    upstream.reply_with(Reply(chunks=[b"ab", b"cd", b"ef"], chunked=True))

    response = httpx.get(proxy.url + "/customer")

    assert response.content == b"abcdef"


@pytest.mark.parametrize(
    ("method", "status"),
    [
        pytest.param("HEAD", 200, id="head"),
        pytest.param("GET", 204, id="204"),
        pytest.param("GET", 304, id="304"),
    ],
)
def test_response_without_body(
    proxy: RunningProxy, upstream: StandInUpstream, method: str, status: int
) -> None:
    upstream.reply_with(Reply(status=status, headers=[("Content-Length", "75")]))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        for _ in range(2):
            sock.sendall(f"{method} /customer HTTP/1.1\r\nHost: p\r\n\r\n".encode())
        first = b""
        while first.count(b"\r\n\r\n") < 2:
            first += sock.recv(4096)

    # Both answers arrive on one connection with nothing between them: no stray body bytes.
    responses = first.split(b"\r\n\r\n")
    assert responses[1].startswith(b"HTTP/1.1 ")
    assert responses[2] == b""


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        pytest.param("{upstream}/customer/1", b"/customer/1", id="upstream-origin"),
        pytest.param("{upstream}?a=1", b"/?a=1", id="origin-query"),
        pytest.param("https://login.example/x", b"https://login.example/x", id="other-origin"),
        pytest.param("/customer/2", b"/customer/2", id="relative"),
    ],
)
def test_redirect_not_followed_and_location_rewritten(
    proxy: RunningProxy, upstream: StandInUpstream, location: str, expected: bytes
) -> None:
    upstream.reply_with(
        Reply(status=302, headers=[("Location", location.format(upstream=upstream.url))])
    )

    response = _get(proxy, "/customer")

    assert _status(response) == 302
    assert _values(response, b"location") == [expected]
    assert len(upstream.requests) == 1


def test_no_cookie_shared_between_callers(proxy: RunningProxy, upstream: StandInUpstream) -> None:
    upstream.reply_with(Reply(headers=[("Set-Cookie", "session=caller-a; Path=/")]))

    _get(proxy, "/customer")
    _get(proxy, "/customer")

    assert upstream.requests[-1].header("cookie") == []


def _envelope(response: bytes) -> dict[str, object]:
    return json.loads(_body(response))


@pytest.mark.parametrize(
    ("reply", "status", "code", "reached"),
    [
        pytest.param(Reply(fail="hang"), 504, "ProxyUpstreamTimeout", True, id="no-answer"),
        pytest.param(Reply(head_delay=3), 504, "ProxyUpstreamTimeout", True, id="slow-headers"),
        pytest.param(Reply(fail="invalid"), 502, "ProxyUpstreamProtocolError", True, id="invalid"),
        pytest.param(
            Reply(fail="close_before_response"),
            502,
            "ProxyUpstreamProtocolError",
            True,
            id="closed",
        ),
        pytest.param(
            Reply(fail="reset_before_response"),
            502,
            "ProxyUpstreamProtocolError",
            True,
            id="reset",
        ),
    ],
)
def test_upstream_failure_envelope(
    upstream: StandInUpstream,
    make_proxy: Callable[..., RunningProxy],
    reply: Reply,
    status: int,
    code: str,
    reached: bool,
) -> None:
    proxy = make_proxy(upstream.url, read_timeout=1)
    upstream.reply_with(reply)

    response = _get(proxy, "/token/payments")

    assert _status(response) == status
    assert _values(response, b"content-type") == [b"application/json"]
    assert _values(response, b"x-nexus-proxy-error") == [code.encode()]
    assert _envelope(response)["errors"] == [code]
    assert _envelope(response)["values"] == {"upstreamReached": reached}
    assert len(upstream.requests) == 1


def test_upstream_refusing_connections(make_proxy: Callable[..., RunningProxy]) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    proxy = make_proxy(f"http://127.0.0.1:{port}")

    response = _get(proxy, "/customer")

    assert _status(response) == 502
    assert _envelope(response)["errors"] == ["ProxyUpstreamUnreachable"]
    assert _envelope(response)["values"] == {"upstreamReached": False}


@pytest.mark.parametrize(
    "request_line",
    [
        pytest.param(b"GET http://127.0.0.1:1/customer HTTP/1.1", id="absolute-form"),
        pytest.param(b"GET https://evil.example/x HTTP/1.1", id="absolute-https"),
        pytest.param(b"CONNECT evil.example:443 HTTP/1.1", id="connect"),
        pytest.param(b"OPTIONS * HTTP/1.1", id="asterisk"),
    ],
)
def test_bad_request_target_refused(
    proxy: RunningProxy, upstream: StandInUpstream, request_line: bytes
) -> None:
    response = raw_exchange(proxy.port, request_line + b"\r\nHost: evil.example\r\n\r\n")

    assert _status(response) == 400
    assert _envelope(response)["errors"] == ["ProxyBadRequest"]
    assert upstream.requests == []
    assert upstream.connections == 0


@pytest.mark.parametrize(
    "chunked", [pytest.param(False, id="length"), pytest.param(True, id="chunked")]
)
def test_upstream_failure_mid_body_aborts_client(
    proxy: RunningProxy, upstream: StandInUpstream, chunked: bool
) -> None:
    headers = [] if chunked else [("Content-Length", "1000")]
    upstream.reply_with(
        Reply(
            headers=headers,
            body=b"x" * 1000,
            chunked=chunked,
            fail="close_mid_body",
            fail_after=100,
        )
    )

    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(proxy.url + "/integrations/documentstore/file")


def test_client_aborts_leave_pool_usable(
    upstream: StandInUpstream, make_proxy: Callable[..., RunningProxy]
) -> None:
    # Five pooled connections and a thousand abandoned requests: each batch reaches
    # the upstream only if the previous batch's connections were released.
    proxy = make_proxy(upstream.url, max_connections=5, pool_timeout=2)
    upstream.reply_with(
        lambda request: Reply(fail="hang") if request.target == b"/hang" else Reply()
    )

    for batch in range(200):
        sockets = [socket.create_connection(("127.0.0.1", proxy.port), timeout=5) for _ in range(5)]
        for sock in sockets:
            sock.sendall(b"GET /hang HTTP/1.1\r\nHost: p\r\n\r\n")
        upstream.wait_for_requests(5 * (batch + 1), timeout=5)
        for sock in sockets:
            sock.close()

    response = httpx.get(proxy.url + "/customer", timeout=10)
    assert response.status_code == 200


def test_client_gone_while_waiting_cancels_upstream(
    proxy: RunningProxy, upstream: StandInUpstream
) -> None:
    upstream.reply_with(Reply(fail="hang"))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"GET /token/envelope/1 HTTP/1.1\r\nHost: p\r\n\r\n")
        upstream.wait_for_requests(1)

    upstream.wait_until(lambda: upstream.closed_connections == upstream.connections, timeout=5)


def test_request_recorded_shape(proxy: RunningProxy, upstream: StandInUpstream) -> None:
    upstream.reply_with(lambda request: Reply(body=request.target))

    response = httpx.get(proxy.url + "/echo")

    assert response.content == b"/echo"
    assert isinstance(upstream.requests[-1], RecordedRequest)


def test_pool_timeout_is_its_own(
    upstream: StandInUpstream, make_proxy: Callable[..., RunningProxy]
) -> None:
    proxy = make_proxy(
        upstream.url, max_connections=1, pool_timeout=0.3, connect_timeout=5, read_timeout=10
    )
    upstream.reply_with(
        lambda request: Reply(fail="hang") if request.target == b"/hang" else Reply()
    )
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as holder:
        holder.sendall(b"GET /hang HTTP/1.1\r\nHost: p\r\n\r\n")
        upstream.wait_for_requests(1)
        started = time.monotonic()
        response = _get(proxy, "/customer")
        waited = time.monotonic() - started

    # Bounded by pool_timeout alone, not by pool_timeout plus connect_timeout.
    assert _status(response) == 503
    assert _envelope(response)["errors"] == ["ProxyUpstreamBusy"]
    assert _envelope(response)["values"] == {"upstreamReached": False}
    assert waited < 3
    assert len(upstream.requests) == 1


def test_admin_path_with_slash_not_redirected(proxy: RunningProxy) -> None:
    response = _get(proxy, "/_proxy/health/", "X-Ignored: 1")

    assert _status(response) == 404
    assert _values(response, b"location") == []


def test_request_trailer_fields_dropped(proxy: RunningProxy, upstream: StandInUpstream) -> None:
    # Head, body and trailer in one write, so the server parses them together.
    response = raw_exchange(
        proxy.port,
        b"POST /token/payments HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n",
    )

    assert _status(response) == 200
    request = upstream.requests[-1]
    assert request.body == b"hello"
    assert request.header("x-trailer") == []
