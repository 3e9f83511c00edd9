"""Who may spend the key, and what may reach the upstream, tested through real sockets.

Hostile requests go over raw sockets, because HTTP clients normalise what they send.
Each test checks what the stand-in upstream received, or that it received nothing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import string
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.conftest import KEY, PROXY_VARS, RunningProxy, raw_exchange
from tests.upstream import Reply, StandInUpstream

pytestmark = pytest.mark.timeout(30)

TOKENS = ("local-token-a1b2", "local-token-c3d4")
BEARER = f"Authorization: Bearer {TOKENS[0]}"
DENY_TOKEN = ["/token/**"]
CONFIG_ERROR_EXIT = 2
CLI_TIMEOUT = 20.0
MIB = 1024 * 1024
MODULE = (sys.executable, "-m", "nexus_proxy")


@dataclass
class Response:
    """One HTTP response as the client read it off the socket."""

    raw: bytes

    @property
    def status(self) -> int:
        """The status code, or 0 when the connection closed without a response."""
        match = re.match(rb"HTTP/1\.[01] (\d{3})", self.raw)
        return int(match[1]) if match else 0

    def header(self, name: str) -> list[bytes]:
        """Every value of header `name`, in order."""
        head = self.raw.split(b"\r\n\r\n", 1)[0]
        values = []
        for line in head.split(b"\r\n")[1:]:
            field, _, value = line.partition(b":")
            if field.strip().lower() == name.encode():
                values.append(value.strip())
        return values

    @property
    def body(self) -> bytes:
        """The bytes after the head."""
        return self.raw.partition(b"\r\n\r\n")[2]

    def envelope(self) -> dict[str, Any]:
        """The body parsed as the proxy's JSON error envelope."""
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


def _request(method: str, target: str, *headers: str, body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: proxy.local", *headers, "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


def _send(proxy: RunningProxy, request: bytes) -> Response:
    return Response(raw_exchange(proxy.port, request))


def _get(proxy: RunningProxy, target: str, *headers: str) -> Response:
    return _send(proxy, _request("GET", target, *headers))


def _read_until_closed(port: int, request: bytes) -> bytes:
    """Send `request` and read everything until the proxy closes the connection."""
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        while chunk := sock.recv(65536):
            data += chunk
    return data


def _statuses(data: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]


def _wait_for_upstream_idle(upstream: StandInUpstream) -> None:
    """Wait until every connection the proxy opened upstream has ended."""
    upstream.wait_until(lambda: upstream.closed_connections == upstream.connections)


@pytest.fixture
def guarded(upstream: StandInUpstream, make_proxy: Callable[..., RunningProxy]) -> RunningProxy:
    """A proxy that requires one of TOKENS."""
    return make_proxy(upstream.url, access_tokens=list(TOKENS))


@pytest.fixture
def policed(upstream: StandInUpstream, make_proxy: Callable[..., RunningProxy]) -> RunningProxy:
    """A proxy that rejects every path under /token."""
    return make_proxy(upstream.url, deny_paths=DENY_TOKEN)


# Access tokens


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([], id="none"),
        pytest.param(["Authorization: Bearer wrong-token"], id="wrong"),
        pytest.param([f"Authorization: Bearer {KEY}"], id="nexus-key"),
        pytest.param(["Authorization: Bearer "], id="empty"),
        pytest.param(["Authorization: Bearer"], id="scheme-only"),
        pytest.param([f"Authorization: {TOKENS[0]}"], id="no-scheme"),
        pytest.param(["Authorization: Basic bG9jYWw6dG9rZW4="], id="basic"),
        pytest.param([BEARER, BEARER], id="two-valid"),
        pytest.param([BEARER, "Authorization: Bearer wrong-token"], id="valid-then-wrong"),
        pytest.param(["Authorization: Bearer wrong-token", BEARER], id="wrong-then-valid"),
        pytest.param([f"Authorization: Bearer {TOKENS[0]} {TOKENS[1]}"], id="both-in-one"),
        pytest.param([f"Authorization: Bearer {TOKENS[0][:-1]}"], id="prefix"),
        pytest.param([f"Proxy-Authorization: Bearer {TOKENS[0]}"], id="proxy-authorization"),
        pytest.param([f"X-Access-Token: {TOKENS[0]}"], id="other-header"),
    ],
)
def test_access_rejects_request(
    guarded: RunningProxy, upstream: StandInUpstream, headers: list[str]
) -> None:
    response = _get(guarded, "/customer", *headers)

    assert response.status == 401
    assert response.header("www-authenticate") == [b'Bearer realm="nexus-proxy"']
    assert response.header("x-nexus-proxy-error") == [b"ProxyUnauthorized"]
    assert response.envelope()["errors"] == ["ProxyUnauthorized"]
    assert response.envelope()["values"] == {"upstreamReached": False}
    assert isinstance(response.envelope()["message"], str)
    assert upstream.connections == 0


def test_access_scheme_any_case(guarded: RunningProxy, upstream: StandInUpstream) -> None:
    # RFC 9110 section 11.1: the authentication scheme is case-insensitive.
    response = _get(guarded, "/customer", f"Authorization: bEARER {TOKENS[0]}")

    assert response.status == 200
    assert upstream.requests[-1].header("authorization") == [f"Bearer {KEY}"]


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        pytest.param([], "access token missing", id="missing"),
        pytest.param(["Authorization: Basic c2VjcmV0LWJhc2ljLTk5"], "malformed", id="basic"),
        pytest.param([BEARER, BEARER], "access token malformed", id="two"),
        pytest.param(["Authorization: Bearer secret-wrong-77"], "not recognised", id="wrong"),
    ],
)
def test_access_logs_reason_not_value(
    guarded: RunningProxy, caplog: pytest.LogCaptureFixture, headers: list[str], reason: str
) -> None:
    caplog.set_level(logging.DEBUG)

    _get(guarded, "/customer", *headers)

    assert reason in caplog.text
    assert "secret-wrong-77" not in caplog.text
    assert "c2VjcmV0LWJhc2ljLTk5" not in caplog.text
    assert TOKENS[0] not in caplog.text


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(f"Authorization: Bearer {TOKENS[0]}", id="first"),
        pytest.param(f"Authorization: Bearer {TOKENS[1]}", id="second"),
        pytest.param(f"AUTHORIZATION: Bearer {TOKENS[0]}", id="upper-case-name"),
        pytest.param(f"aUtHoRiZaTiOn:Bearer {TOKENS[0]}", id="mixed-case-no-space"),
        pytest.param(f"Authorization: \t Bearer {TOKENS[0]} \t", id="surrounding-whitespace"),
    ],
)
def test_access_swaps_token_for_key(
    guarded: RunningProxy, upstream: StandInUpstream, header: str
) -> None:
    response = _get(guarded, "/customer", header)

    assert response.status == 200
    assert upstream.requests[0].header("authorization") == [f"Bearer {KEY}"]
    assert all(token.encode() not in upstream.requests[0].raw_head for token in TOKENS)


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(
            f"GET /x HTTP/1.1\r\nHost: p\r\nAuthorization : Bearer {TOKENS[0]}\r\n\r\n",
            id="space-before-colon",
        ),
        pytest.param(
            f"GET /x HTTP/1.1\r\nHost: p\r\nAuthorization\t: Bearer {TOKENS[0]}\r\n\r\n",
            id="tab-before-colon",
        ),
        pytest.param(
            f"GET /x HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer\r\n {TOKENS[0]}\r\n\r\n",
            id="folded-line",
        ),
        pytest.param(
            f"GET /x HTTP/1.1\nHost: p\nAuthorization: Bearer {TOKENS[0]}\n\n", id="bare-lf"
        ),
        pytest.param(
            f"GET /x HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer {TOKENS[0]}\x00\r\n\r\n",
            id="nul-in-value",
        ),
        pytest.param(
            f"GET /x HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer {TOKENS[0]}\rX: y\r\n\r\n",
            id="bare-cr-in-value",
        ),
    ],
)
def test_access_header_syntax_errors_rejected(
    guarded: RunningProxy, upstream: StandInUpstream, request_bytes: str
) -> None:
    response = _send(guarded, request_bytes.encode())

    assert response.status == 400
    assert upstream.connections == 0


def test_access_tokens_from_env(
    upstream: StandInUpstream,
    make_proxy: Callable[..., RunningProxy],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NEXUS_PROXY_ACCESS_TOKENS", ",".join(TOKENS))
    proxy = make_proxy(upstream.url)

    rejected = _get(proxy, "/customer")
    accepted = _get(proxy, "/customer", f"Authorization: Bearer {TOKENS[1]}")

    assert rejected.status == 401
    assert accepted.status == 200
    assert upstream.requests[0].header("authorization") == [f"Bearer {KEY}"]


def test_access_tokens_from_file(
    upstream: StandInUpstream, make_proxy: Callable[..., RunningProxy], tmp_path: Path
) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"\n{TOKENS[0]}\n\n{TOKENS[1]}\n")
    path.chmod(0o600)
    proxy = make_proxy(upstream.url, access_token_file=path)

    rejected = _get(proxy, "/customer", "Authorization: Bearer wrong-token")
    first = _get(proxy, "/customer", f"Authorization: Bearer {TOKENS[0]}")
    second = _get(proxy, "/customer", f"Authorization: Bearer {TOKENS[1]}")

    assert rejected.status == 401
    assert first.status == 200
    assert second.status == 200
    assert len(upstream.requests) == 2


def test_access_checks_each_pipelined_request(
    guarded: RunningProxy, upstream: StandInUpstream
) -> None:
    first = _request("GET", "/customer", BEARER)
    second = _request("GET", "/token/payments", "Connection: close")

    data = _read_until_closed(guarded.port, first + second)

    assert _statuses(data) == [200, 401]
    assert [request.target for request in upstream.requests] == [b"/customer"]


@pytest.mark.parametrize(
    "path", ["/_proxy/metrics", "/_proxy/ready", "/%5Fproxy/metrics", "/_proxy/%72eady"]
)
@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([], id="none"),
        pytest.param(["Authorization: Bearer wrong-token"], id="wrong"),
        pytest.param([f"Authorization: Bearer {KEY}"], id="nexus-key"),
    ],
)
def test_access_guards_admin_endpoint(
    guarded: RunningProxy, upstream: StandInUpstream, path: str, headers: list[str]
) -> None:
    response = _get(guarded, path, *headers)

    assert response.status == 401
    assert response.header("www-authenticate") == [b'Bearer realm="nexus-proxy"']
    assert response.envelope()["errors"] == ["ProxyUnauthorized"]
    assert upstream.connections == 0


@pytest.mark.parametrize("path", ["/_proxy/metrics", "/_proxy/ready"])
def test_access_opens_admin_endpoint_with_token(guarded: RunningProxy, path: str) -> None:
    assert _get(guarded, path, BEARER).status == 200


def test_access_health_needs_no_token(guarded: RunningProxy, upstream: StandInUpstream) -> None:
    response = _get(guarded, "/_proxy/health")

    assert response.status == 200
    assert upstream.connections == 0


# Listening beyond loopback


def _cli_environment(**variables: str) -> dict[str, str]:
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("NEXUS_PROXY_") and name.upper() not in PROXY_VARS
    }
    environment.update(variables)
    return environment


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_exposure_cli_rejects_remote_host(host: str, tmp_path: Path) -> None:
    process = subprocess.Popen(
        [*MODULE, "--host", host, "--port", "0", "--upstream-url", "http://127.0.0.1:9"],
        cwd=tmp_path,
        env=_cli_environment(NEXUS_PROXY_API_KEY=KEY),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, stderr = process.communicate(timeout=CLI_TIMEOUT)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.communicate()

    assert process.returncode == CONFIG_ERROR_EXIT
    assert "access_tokens" in stderr
    assert "allow_unauthenticated_remote" in stderr


# Request policy


@pytest.mark.parametrize(
    "target",
    [
        pytest.param("/token/payments", id="plain"),
        pytest.param("/TOKEN/PAYMENTS", id="upper-case"),
        pytest.param("/Token/Payments/", id="trailing-slash"),
        pytest.param("//token/payments", id="leading-double-slash"),
        pytest.param("/token//payments", id="inner-double-slash"),
        pytest.param("/t%6Fken/payments", id="escaped-letter"),
        pytest.param("/%74%6f%6b%65%6e/payments", id="escaped-segment"),
        pytest.param("/token", id="base"),
        pytest.param("/token/", id="base-slash"),
        pytest.param("/token?next=/customer", id="query"),
        pytest.param("/token#/../customer", id="fragment"),
    ],
)
def test_policy_rejects_denied_path(
    policed: RunningProxy, upstream: StandInUpstream, target: str
) -> None:
    response = _get(policed, target)

    assert response.status == 403
    assert response.header("x-nexus-proxy-error") == [b"ProxyForbidden"]
    assert response.envelope()["errors"] == ["ProxyForbidden"]
    assert response.envelope()["values"] == {"upstreamReached": False}
    assert upstream.connections == 0


@pytest.mark.parametrize(
    "target",
    [
        pytest.param("/x/../token/payments", id="dot-dot"),
        pytest.param("/./token/payments", id="dot"),
        pytest.param("/customer/..", id="trailing-dot-dot"),
        pytest.param("/%2e%2e/token", id="encoded-dot-dot"),
        pytest.param("/x/%2E%2E/token", id="encoded-dot-dot-upper"),
        pytest.param("/token%2Fpayments", id="encoded-slash"),
        pytest.param("/token%2fpayments", id="encoded-slash-lower"),
        pytest.param("/x%5C..%5Ctoken", id="encoded-backslash"),
        pytest.param("/x\\..\\token", id="raw-backslash"),
        pytest.param("/%252e%252e/token", id="double-encoded"),
        pytest.param("/t%00oken", id="encoded-nul"),
        pytest.param("/token;a=b/payments", id="semicolon"),
        pytest.param("/customer;/../token", id="semicolon-dot-dot"),
    ],
)
def test_policy_rejects_ambiguous_path(
    policed: RunningProxy, upstream: StandInUpstream, target: str
) -> None:
    response = _get(policed, target)

    assert response.status == 400
    assert response.envelope()["errors"] == ["ProxyBadRequest"]
    assert response.envelope()["values"] == {"upstreamReached": False}
    assert upstream.connections == 0


def test_policy_forwards_other_path_unchanged(
    policed: RunningProxy, upstream: StandInUpstream
) -> None:
    response = _get(policed, "/Customer/a%20b?token=/token/payments")

    assert response.status == 200
    assert upstream.requests[0].target == b"/Customer/a%20b?token=/token/payments"


def test_policy_logs_rule(policed: RunningProxy, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="nexus_proxy")

    _get(policed, "/token/payments")

    assert "deny_paths '/token/**'" in caplog.text


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "TRACE"])
def test_read_only_rejects_method(
    upstream: StandInUpstream, make_proxy: Callable[..., RunningProxy], method: str
) -> None:
    proxy = make_proxy(upstream.url, read_only=True)

    response = _send(proxy, _request(method, "/customer", "Content-Length: 0"))

    assert response.status == 403
    assert response.envelope()["errors"] == ["ProxyForbidden"]
    assert upstream.connections == 0


@pytest.mark.parametrize("method", ["get", "Get", "gET"])
def test_read_only_rejects_method_case_variant(
    upstream: StandInUpstream, make_proxy: Callable[..., RunningProxy], method: str
) -> None:
    proxy = make_proxy(upstream.url, read_only=True)

    response = _send(proxy, _request(method, "/customer"))

    # The HTTP parser accepts upper-case methods only, so it returns 400 itself.
    assert response.status in (400, 403)
    assert upstream.connections == 0


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS"])
def test_read_only_forwards_safe_method(
    upstream: StandInUpstream, make_proxy: Callable[..., RunningProxy], method: str
) -> None:
    proxy = make_proxy(upstream.url, read_only=True)

    # A HEAD response declares a length but carries no body, so the close ends the read.
    response = _send(proxy, _request(method, "/customer", "Connection: close"))

    assert response.status == 200
    assert upstream.requests[0].method == method


@pytest.mark.parametrize(
    ("target", "status"),
    [
        pytest.param("/customer/abc", 200, id="allowed"),
        pytest.param("/CUSTOMER/abc/", 200, id="allowed-spelling"),
        pytest.param("/customer/blocked", 403, id="denied-inside-allowed"),
        pytest.param("/Customer/Blocked/", 403, id="denied-spelling"),
        pytest.param("/token/payments", 403, id="not-allowed"),
        pytest.param("/customerx", 403, id="not-allowed-sibling"),
    ],
)
def test_allow_and_deny_paths(
    upstream: StandInUpstream, make_proxy: Callable[..., RunningProxy], target: str, status: int
) -> None:
    proxy = make_proxy(upstream.url, allow_paths=["/customer/**"], deny_paths=["/customer/blocked"])

    response = _get(proxy, target)

    assert response.status == status
    assert len(upstream.requests) == (1 if status == 200 else 0)


# Targets that are not in origin form


NON_ORIGIN_TARGETS = [
    pytest.param("GET http://127.0.0.1:{port}/token/payments", id="absolute"),
    pytest.param("GET HTTP://127.0.0.1:{port}/customer", id="absolute-upper-scheme"),
    pytest.param("GET https://127.0.0.1:{port}/customer", id="absolute-https"),
    pytest.param("GET http://127.0.0.1:{port}", id="absolute-no-path"),
    pytest.param("POST http://127.0.0.1:{port}/customer", id="absolute-post"),
    pytest.param("CONNECT 127.0.0.1:{port}", id="authority"),
    pytest.param("OPTIONS *", id="asterisk"),
]


@pytest.mark.parametrize("rules", [{}, {"deny_paths": DENY_TOKEN}], ids=["no-rules", "rules"])
@pytest.mark.parametrize("line", NON_ORIGIN_TARGETS)
def test_target_not_origin_form_rejected(
    upstream: StandInUpstream,
    make_proxy: Callable[..., RunningProxy],
    rules: dict[str, Any],
    line: str,
) -> None:
    proxy = make_proxy(upstream.url, **rules)
    request = f"{line.format(port=upstream.port)} HTTP/1.1\r\nHost: p\r\nContent-Length: 0\r\n\r\n"

    response = _send(proxy, request.encode())

    assert response.status == 400
    assert response.envelope()["errors"] == ["ProxyBadRequest"]
    assert upstream.connections == 0


# Limits


def test_body_declared_over_limit(
    upstream: StandInUpstream, make_proxy: Callable[..., RunningProxy]
) -> None:
    proxy = make_proxy(upstream.url, max_body_size=100)

    response = _send(proxy, _request("POST", "/x", "Content-Length: 101", body=b"a" * 101))

    assert response.status == 413
    assert response.header("x-nexus-proxy-error") == [b"ProxyBodyTooLarge"]
    assert response.envelope()["values"] == {"upstreamReached": False}
    assert upstream.connections == 0


def test_body_declared_over_default_limit(proxy: RunningProxy, upstream: StandInUpstream) -> None:
    response = _send(proxy, _request("POST", "/x", f"Content-Length: {100 * MIB + 1}"))

    assert response.status == 413
    assert response.envelope()["errors"] == ["ProxyBodyTooLarge"]
    assert upstream.connections == 0


@pytest.mark.parametrize(("max_body_size", "size"), [(100, 100), (0, 5000)], ids=["at", "zero"])
def test_body_within_limit_forwarded(
    upstream: StandInUpstream,
    make_proxy: Callable[..., RunningProxy],
    max_body_size: int,
    size: int,
) -> None:
    proxy = make_proxy(upstream.url, max_body_size=max_body_size)

    response = _send(proxy, _request("POST", "/x", f"Content-Length: {size}", body=b"a" * size))

    assert response.status == 200
    assert upstream.requests[0].body_size == size


def test_body_chunked_over_limit_aborted(
    upstream: StandInUpstream, make_proxy: Callable[..., RunningProxy]
) -> None:
    proxy = make_proxy(upstream.url, max_body_size=1000)
    chunk = b"258\r\n" + b"a" * 600 + b"\r\n"
    request = _request("POST", "/x", "Transfer-Encoding: chunked") + chunk * 2 + b"0\r\n\r\n"

    response = _send(proxy, request)
    _wait_for_upstream_idle(upstream)

    assert response.status == 413
    assert response.envelope()["errors"] == ["ProxyBodyTooLarge"]
    assert response.envelope()["values"] == {"upstreamReached": True}
    assert upstream.requests == []


def test_headers_over_max_size(
    upstream: StandInUpstream, make_proxy: Callable[..., RunningProxy]
) -> None:
    proxy = make_proxy(upstream.url, max_header_size=1024)

    response = _get(proxy, "/x", "X-Big: " + "a" * 2000)

    assert response.status == 431
    assert response.header("x-nexus-proxy-error") == [b"ProxyHeadersTooLarge"]
    assert response.envelope()["values"] == {"upstreamReached": False}
    assert upstream.connections == 0


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(["X-Big: " + "a" * 70000], id="one-large-field"),
        pytest.param([f"X-F{i}: " + "a" * 1000 for i in range(70)], id="many-fields"),
    ],
)
def test_headers_over_default_size(
    proxy: RunningProxy, upstream: StandInUpstream, headers: list[str]
) -> None:
    response = _get(proxy, "/x", *headers)

    assert response.status == 431
    assert upstream.connections == 0


def test_headers_over_max_size_in_target(proxy: RunningProxy, upstream: StandInUpstream) -> None:
    response = _get(proxy, "/x?" + "a" * 70000)

    assert response.status == 431
    assert upstream.connections == 0


@pytest.mark.parametrize(("count", "status"), [(100, 200), (101, 431)], ids=["100", "101"])
def test_headers_field_count(
    proxy: RunningProxy, upstream: StandInUpstream, count: int, status: int
) -> None:
    # The Host field that _request adds is one of the `count`.
    response = _get(proxy, "/x", *[f"X-F{i}: 1" for i in range(count - 1)])

    assert response.status == status
    assert len(upstream.requests) == (1 if status == 200 else 0)


@pytest.fixture
def impatient(upstream: StandInUpstream, make_proxy: Callable[..., RunningProxy]) -> RunningProxy:
    """A proxy that waits half a second for a request head or a body read."""
    return make_proxy(upstream.url, client_header_timeout=0.5, client_body_timeout=0.5)


def _read_response(sock: socket.socket) -> Response:
    """Read until the proxy closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return Response(data)


def _read_one_response(sock: socket.socket) -> Response:
    """Read one response framed by Content-Length, leaving the connection open."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += _receive(sock)
    response = Response(data)
    length = int(response.header("content-length")[0])
    while len(response.body) < length:
        response = Response(response.raw + _receive(sock))
    return response


def _receive(sock: socket.socket) -> bytes:
    chunk = sock.recv(65536)
    if not chunk:
        raise AssertionError("the proxy closed the connection inside a response")
    return chunk


def test_header_timeout_slowloris(impatient: RunningProxy, upstream: StandInUpstream) -> None:
    with socket.create_connection(("127.0.0.1", impatient.port), timeout=5) as slow:
        slow.sendall(b"GET /x HTTP/1.1\r\nHost: p\r\nX-Slow: ")

        served = _get(impatient, "/customer")
        response = _read_response(slow)

    assert served.status == 200
    assert response.status == 408
    assert response.envelope()["errors"] == ["ProxyClientTimeout"]
    assert response.envelope()["values"] == {"upstreamReached": False}
    assert [request.target for request in upstream.requests] == [b"/customer"]


def test_header_timeout_idle_connection(impatient: RunningProxy, upstream: StandInUpstream) -> None:
    with socket.create_connection(("127.0.0.1", impatient.port), timeout=5) as idle:
        response = _read_response(idle)

    assert response.status == 408
    assert upstream.connections == 0


def test_header_timeout_second_request(impatient: RunningProxy, upstream: StandInUpstream) -> None:
    with socket.create_connection(("127.0.0.1", impatient.port), timeout=5) as client:
        client.sendall(_request("GET", "/first"))
        first = _read_one_response(client)
        client.sendall(b"GET /second HTTP/1.1\r\nHost: p\r\n")
        second = _read_response(client)

    assert first.status == 200
    assert second.status == 408
    assert [request.target for request in upstream.requests] == [b"/first"]


def test_body_timeout_aborts_upstream(impatient: RunningProxy, upstream: StandInUpstream) -> None:
    with socket.create_connection(("127.0.0.1", impatient.port), timeout=5) as client:
        client.sendall(_request("POST", "/x", "Content-Length: 100", body=b"a" * 10))
        response = _read_response(client)
    _wait_for_upstream_idle(upstream)

    assert response.status == 408
    assert response.envelope()["errors"] == ["ProxyClientTimeout"]
    assert response.envelope()["values"] == {"upstreamReached": True}
    assert upstream.requests == []


PIPELINED_ERRORS = [
    pytest.param(b"GET /second HTTP/1.1\r\nHost: p\r\n", id="head-timeout"),
    pytest.param(
        b"GET /second HTTP/1.1\r\nHost: p\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n",
        id="head-too-large",
    ),
    pytest.param(b"GET /second HTTP/1.1 junk\r\n\r\n", id="parser-error"),
]


@pytest.mark.parametrize("second", PIPELINED_ERRORS)
def test_pipelined_error_keeps_first_response(
    upstream: StandInUpstream, make_proxy: Callable[..., RunningProxy], second: bytes
) -> None:
    # The upstream replies 1.5 s late, well after the 0.5 s head timeout has passed.
    upstream.reply_with(Reply(head_delay=1.5))
    proxy = make_proxy(upstream.url, max_header_size=1024, client_header_timeout=0.5)

    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
        client.sendall(_request("POST", "/payments", "Content-Length: 2", body=b"hi"))
        upstream.wait_for_requests(1)
        client.sendall(second)
        data = _read_response(client).raw

    assert [request.target for request in upstream.requests] == [b"/payments"]
    assert _statuses(data)[:1] == [200]


def test_body_over_limit_skips_continue(
    upstream: StandInUpstream, make_proxy: Callable[..., RunningProxy]
) -> None:
    proxy = make_proxy(upstream.url, max_body_size=100)
    request = _request("POST", "/x", "Content-Length: 101", "Expect: 100-continue")

    response = _send(proxy, request)

    assert response.status == 413
    assert b"100 Continue" not in response.raw
    assert upstream.connections == 0


# Request smuggling


SMUGGLING_HEADS = [
    pytest.param(["Content-Length: 5", "Transfer-Encoding: chunked"], id="length-and-chunked"),
    pytest.param(["Transfer-Encoding: chunked", "Content-Length: 5"], id="chunked-and-length"),
    pytest.param(["Content-Length: 5", "Content-Length: 6"], id="two-lengths"),
    pytest.param(["Content-Length: 5", "Content-Length: 5"], id="two-equal-lengths"),
    pytest.param(["Content-Length: 5, 5"], id="length-list"),
    pytest.param(["Content-Length: +5"], id="length-plus"),
    pytest.param(["Content-Length: 0x5"], id="length-hex"),
    pytest.param(["Transfer-Encoding: gzip, chunked"], id="gzip-chunked"),
    pytest.param(["Transfer-Encoding: chunked, gzip"], id="chunked-gzip"),
    pytest.param(["Transfer-Encoding: chunked", "Transfer-Encoding: chunked"], id="chunked-twice"),
    pytest.param(["Transfer-Encoding: identity", "Content-Length: 5"], id="identity"),
    pytest.param(["Transfer-Encoding: xchunked"], id="xchunked"),
    pytest.param(["Transfer-Encoding : chunked"], id="space-before-colon"),
    pytest.param(["Transfer-Encoding:\x0bchunked"], id="vertical-tab"),
    pytest.param(["Content-Length: 5", "Transfer-Encoding:", " chunked"], id="folded"),
]


@pytest.mark.parametrize("headers", SMUGGLING_HEADS)
def test_smuggling_framing_rejected(
    proxy: RunningProxy, upstream: StandInUpstream, headers: list[str]
) -> None:
    body = b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: p\r\n\r\n"

    response = _send(proxy, _request("POST", "/x", *headers, body=body))

    assert response.status == 400
    assert upstream.connections == 0


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"zz\r\nhello\r\n0\r\n\r\n", id="size-not-hex"),
        pytest.param(b"5\r\nhelloX\r\n0\r\n\r\n", id="data-without-crlf"),
        pytest.param(b"fffffffffffffffffff\r\nhello\r\n0\r\n\r\n", id="size-overflow"),
        pytest.param(b"-5\r\nhello\r\n0\r\n\r\n", id="size-negative"),
        pytest.param(b"5\nhello\n0\n\n", id="bare-lf"),
        pytest.param(b"5 x\r\nhello\r\n0\r\n\r\n", id="size-with-junk"),
    ],
)
def test_smuggling_bad_chunks_never_complete(
    proxy: RunningProxy, upstream: StandInUpstream, body: bytes
) -> None:
    response = _send(proxy, _request("POST", "/x", "Transfer-Encoding: chunked", body=body))
    _wait_for_upstream_idle(upstream)

    assert response.status == 400
    assert upstream.requests == []


def test_bad_chunk_after_forwarding_reports_reached(
    proxy: RunningProxy, upstream: StandInUpstream
) -> None:
    # The first chunk has gone upstream when the broken one arrives, so the
    # envelope must not tell the client that nothing was sent.
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(_request("POST", "/x", "Transfer-Encoding: chunked") + b"3\r\nabc\r\n")
        assert upstream.body_started.wait(5)
        sock.sendall(b"zz\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    response = Response(data)
    _wait_for_upstream_idle(upstream)

    assert response.status == 400
    assert response.envelope()["errors"] == ["ProxyBadRequest"]
    assert response.envelope()["values"] == {"upstreamReached": True}
    assert upstream.requests == []


def test_smuggling_pipelined_request_checked(
    policed: RunningProxy, upstream: StandInUpstream
) -> None:
    first = _request("POST", "/customer", "Content-Length: 5", body=b"hello")
    second = _request("GET", "/token/payments", "Connection: close")

    data = _read_until_closed(policed.port, first + second)

    assert _statuses(data) == [200, 403]
    assert [request.target for request in upstream.requests] == [b"/customer"]
    assert upstream.requests[0].body == b"hello"


def test_smuggling_upgrade_does_not_tunnel(
    policed: RunningProxy, upstream: StandInUpstream
) -> None:
    first = _request("GET", "/customer", "Upgrade: h2c", "Connection: Upgrade, HTTP2-Settings")
    second = _request("GET", "/token/payments")

    response = _send(policed, first + second)

    assert response.status == 200
    assert [request.target for request in upstream.requests] == [b"/customer"]
    assert upstream.requests[0].header("upgrade") == []


# A socket that must never be contacted


class Canary:
    """A listening loopback socket; any connection attempt waits in its backlog."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.port: int = self.sock.getsockname()[1]

    def connections(self) -> int:
        """Accept and count the connections made so far."""
        count = 0
        while True:
            try:
                connection, _ = self.sock.accept()
            except BlockingIOError:
                return count
            connection.close()
            count += 1


@pytest.fixture
def canary() -> Iterator[Canary]:
    """A loopback port that nothing may connect to."""
    watched = Canary()
    try:
        yield watched
    finally:
        watched.sock.close()


@pytest.mark.parametrize(
    "request_text",
    [
        pytest.param("GET http://127.0.0.1:{canary}/x HTTP/1.1\r\nHost: p\r\n\r\n", id="absolute"),
        pytest.param(
            "GET http://127.0.0.1:{canary}/x HTTP/1.1\r\nHost: 127.0.0.1:{canary}\r\n\r\n",
            id="absolute-and-host",
        ),
        pytest.param("CONNECT 127.0.0.1:{canary} HTTP/1.1\r\nHost: p\r\n\r\n", id="connect"),
        pytest.param("GET //127.0.0.1:{canary}/x HTTP/1.1\r\nHost: p\r\n\r\n", id="double-slash"),
        pytest.param(
            "GET /\\127.0.0.1:{canary}/x HTTP/1.1\r\nHost: p\r\n\r\n", id="slash-backslash"
        ),
        pytest.param("GET /x HTTP/1.1\r\nHost: 127.0.0.1:{canary}\r\n\r\n", id="host"),
        pytest.param(
            "GET /x HTTP/1.1\r\nHost: p\r\nX-Forwarded-Host: 127.0.0.1:{canary}\r\n"
            "X-Forwarded-Proto: http\r\nX-Forwarded-Port: {canary}\r\n\r\n",
            id="forwarded-headers",
        ),
        pytest.param(
            "GET /x HTTP/1.1\r\nHost: p\r\nForwarded: host=127.0.0.1:{canary}\r\n\r\n",
            id="forwarded",
        ),
        pytest.param(
            "GET /x HTTP/1.1\r\nHost: p\r\nX-Original-URL: http://127.0.0.1:{canary}/x\r\n\r\n",
            id="original-url",
        ),
        pytest.param("GET @127.0.0.1:{canary}/x HTTP/1.1\r\nHost: p\r\n\r\n", id="at-sign-target"),
    ],
)
def test_canary_never_contacted(
    proxy: RunningProxy, upstream: StandInUpstream, canary: Canary, request_text: str
) -> None:
    _send(proxy, request_text.format(canary=canary.port).encode())

    assert canary.connections() == 0


def test_canary_upstream_redirect_not_followed(
    upstream: StandInUpstream,
    make_proxy: Callable[..., RunningProxy],
    canary: Canary,
) -> None:
    location = f"http://127.0.0.1:{canary.port}/x"
    upstream.reply_with(Reply(status=302, headers=[("location", location)], body=b""))
    proxy = make_proxy(upstream.url)

    response = _get(proxy, "/customer")

    assert response.status == 302
    assert response.header("location") == [location.encode()]
    assert canary.connections() == 0


# Properties over generated requests


PATH_ALPHABET = "/.%0123456789abcdefABCDEFtokenpaymentscustomer;\\?#@:"
SEGMENTS = [
    "token", "TOKEN", "t%6Fken", "%74oken", "payments", "customer", "", ".", "..",
    "%2e", "%2E%2e", "%2F", "%5c", "%25", "%00", "\\", ";x", "a;", "%3B", "@", ":", "?", "#",
]  # fmt: skip
SAFE_VALUE = string.ascii_letters + string.digits + " -_.,=/"
# Names that change the framing would make the proxy wait for a body never sent.
FRAMING_NAMES = {"content-length", "transfer-encoding", "expect"}

raw_paths = st.text(alphabet=PATH_ALPHABET, min_size=1, max_size=40)
paths = st.one_of(
    raw_paths,
    raw_paths.map(lambda path: "/" + path),
    st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=6).map(lambda s: "/" + "/".join(s)),
)
header_names = st.one_of(
    st.sampled_from(["Host", "Connection", "Proxy-Authorization", "X-Forwarded-Host", "Upgrade"]),
    st.text(alphabet=string.ascii_letters + string.digits + "-", min_size=1, max_size=16),
).filter(lambda name: name.lower() not in FRAMING_NAMES | {"authorization"})
header_values = st.text(alphabet=SAFE_VALUE, max_size=30).map(str.strip)
authorization_values = st.one_of(
    st.sampled_from(["Bearer ", f"Bearer {KEY}", "Basic eDp5", f"bearer {TOKENS[0]}"]),
    header_values.map(lambda value: "Bearer " + value),
)
authorization_names = st.sampled_from(["Authorization", "authorization", "AUTHORIZATION"])
authorization_headers = st.one_of(
    st.tuples(authorization_names, st.sampled_from(TOKENS).map(lambda t: f"Bearer {t}")).map(
        lambda header: [header]
    ),
    st.lists(st.tuples(authorization_names, authorization_values), max_size=2),
    st.lists(
        st.tuples(authorization_names, st.sampled_from([f"Bearer {t}" for t in TOKENS])),
        min_size=2,
        max_size=2,
    ),
)


@dataclass(frozen=True)
class Variant:
    """Settings of the proxy under a property test."""

    tokens: tuple[str, ...]
    deny: bool


VARIANTS = [
    pytest.param(Variant((), False), id="open"),
    pytest.param(Variant(TOKENS, False), id="tokens"),
    pytest.param(Variant(TOKENS, True), id="tokens-and-deny"),
]


def _reads_as_token(target: bytes) -> bool:
    """Whether a server that decodes once and resolves dot segments reads /token under it.

    A `;` starts a path parameter only before decoding, as in servlet containers. An
    encoded slash or backslash is read as a separator, the stricter of the readings.
    """
    path = target.split(b"?", 1)[0].split(b"#", 1)[0].decode("latin-1")
    decoded = []
    for segment in re.split(r"[/\\]", path):
        decoded.append(unquote(segment.split(";", 1)[0], encoding="latin-1"))
    segments: list[str] = []
    for segment in re.split(r"[/\\]", "/".join(decoded).lower()):
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    return segments[:1] == ["token"]


@pytest.fixture
def variant_proxy(
    request: pytest.FixtureRequest,
    upstream: StandInUpstream,
    make_proxy: Callable[..., RunningProxy],
) -> tuple[Variant, RunningProxy]:
    """The proxy for one Variant, shared by every example of a property test."""
    variant: Variant = request.param
    proxy = make_proxy(
        upstream.url,
        access_tokens=list(variant.tokens),
        deny_paths=DENY_TOKEN if variant.deny else [],
    )
    return variant, proxy


@pytest.mark.parametrize("variant_proxy", VARIANTS, indirect=True)
@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    path=paths,
    headers=st.lists(st.tuples(header_names, header_values), max_size=6),
    authorization=authorization_headers,
)
def test_property_only_key_reaches_upstream(
    upstream: StandInUpstream,
    variant_proxy: tuple[Variant, RunningProxy],
    path: str,
    headers: list[tuple[str, str]],
    authorization: list[tuple[str, str]],
) -> None:
    variant, proxy = variant_proxy
    lines = [f"{name}: {value}" for name, value in [*headers, *authorization]]
    before = len(upstream.requests)

    response = _send(proxy, _request("GET", path, *lines))

    assert KEY.encode() not in response.raw
    received = upstream.requests[before:]
    event("forwarded" if received else f"rejected with {response.status}")
    if not received:
        _assert_rejected(response)
        return
    assert len(received) == 1
    assert response.status == 200
    assert received[0].header("authorization") == [f"Bearer {KEY}"]
    assert all(token.encode() not in received[0].raw_head for token in TOKENS)
    if variant.tokens:
        # The scheme name may come in any case (RFC 9110 section 11.1), the token may not.
        values = [value[:7].lower() + value[7:] for _, value in authorization]
        assert values in [[f"bearer {t}"] for t in TOKENS]
    if variant.deny:
        assert not _reads_as_token(received[0].target)


def _assert_rejected(response: Response) -> None:
    assert 400 <= response.status < 500
    if response.header("content-type") == [b"application/json"]:
        envelope = response.envelope()
        assert envelope["errors"][0].startswith("Proxy")
        assert envelope["values"] == {"upstreamReached": False}
    else:
        # uvicorn's own 400 response to a request that the HTTP parser rejected.
        assert response.status == 400
