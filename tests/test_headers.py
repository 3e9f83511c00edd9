"""Header policy as tables of cases: pure functions, no sockets."""

from __future__ import annotations

import httpx
import pytest

from nexus_proxy.headers import RequestPolicy, ResponsePolicy

AUTH = b"Bearer key"


def _policy(iso8601: bool = True, defaults: dict[str, str] | None = None) -> RequestPolicy:
    return RequestPolicy("nexus.example", iso8601=iso8601, defaults=defaults or {})


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        pytest.param([], [], id="empty"),
        pytest.param(
            [(b"x-a", b"1"), (b"x-a", b"2")], [(b"x-a", b"1"), (b"x-a", b"2")], id="repeats"
        ),
        pytest.param(
            [(b"connection", b"x-b"), (b"x-b", b"1"), (b"x-c", b"2")],
            [(b"x-c", b"2")],
            id="named-by-connection",
        ),
        pytest.param(
            [(b"connection", b"X-B , x-c"), (b"x-b", b"1"), (b"x-c", b"2")],
            [],
            id="connection-list",
        ),
        pytest.param([(b"host", b"proxy:8080")], [], id="host-replaced"),
        pytest.param([(b"authorization", b"Bearer dummy")], [], id="client-auth-dropped"),
        pytest.param([(b"expect", b"100-continue")], [], id="expect-answered-here"),
        pytest.param(
            [(b"te", b"trailers"), (b"trailer", b"x"), (b"upgrade", b"h2c")], [], id="hop-by-hop"
        ),
        pytest.param(
            [(b"proxy-authorization", b"x"), (b"proxy-connection", b"k")],
            [],
            id="proxy-credentials",
        ),
        pytest.param([(b"keep-alive", b"timeout=5")], [], id="keep-alive"),
        pytest.param(
            [(b"customer_ip_address", b"203.0.113.9")],
            [(b"customer_ip_address", b"203.0.113.9")],
            id="underscore",
        ),
        pytest.param(
            [(b"x-forwarded-for", b"1.2.3.4")],
            [(b"x-forwarded-for", b"1.2.3.4")],
            id="forwarded-passes",
        ),
    ],
)
def test_request_policy_passes_end_to_end_headers(
    client: list[tuple[bytes, bytes]], expected: list[tuple[bytes, bytes]]
) -> None:
    headers, _ = _policy(iso8601=False).apply(client, AUTH)

    assert headers[0] == (b"host", b"nexus.example")
    assert headers[-1] == (b"authorization", AUTH)
    assert headers[1:-1] == expected


@pytest.mark.parametrize(
    ("client", "upstream_framing", "has_body"),
    [
        pytest.param([], [], False, id="no-body"),
        pytest.param(
            [(b"content-length", b"0")], [(b"content-length", b"0")], True, id="zero-length"
        ),
        pytest.param([(b"content-length", b"12")], [(b"content-length", b"12")], True, id="length"),
        pytest.param(
            [(b"transfer-encoding", b"chunked")],
            [(b"transfer-encoding", b"chunked")],
            True,
            id="chunked",
        ),
        pytest.param(
            [(b"content-length", b"12"), (b"transfer-encoding", b"chunked")],
            [(b"transfer-encoding", b"chunked")],
            True,
            id="both-means-chunked",
        ),
    ],
)
def test_request_policy_framing(
    client: list[tuple[bytes, bytes]], upstream_framing: list[tuple[bytes, bytes]], has_body: bool
) -> None:
    headers, framing = _policy(iso8601=False).apply(client, AUTH)

    framing_headers = [h for h in headers if h[0] in (b"content-length", b"transfer-encoding")]
    assert framing_headers == upstream_framing
    assert framing.has_body is has_body


def test_request_policy_iso8601_replaces_client_value() -> None:
    headers, _ = _policy().apply([(b"request_iso8601", b"false")], AUTH)

    assert [v for n, v in headers if n == b"request_iso8601"] == [b"true"]


def test_request_policy_defaults_only_when_absent() -> None:
    policy = _policy(defaults={"api_version": "1.2", "X-Team": "ops"})

    headers, _ = policy.apply([(b"api_version", b"1.1")], AUTH)

    assert [v for n, v in headers if n == b"api_version"] == [b"1.1"]
    assert [v for n, v in headers if n == b"x-team"] == [b"ops"]


@pytest.mark.parametrize(
    ("upstream", "location", "expected"),
    [
        pytest.param(
            "https://nexus.example",
            b"https://nexus.example/customer/1",
            b"/customer/1",
            id="same-origin",
        ),
        pytest.param(
            "https://nexus.example", b"HTTPS://NEXUS.EXAMPLE/a", b"/a", id="case-insensitive-origin"
        ),
        pytest.param(
            "https://nexus.example",
            b"https://nexus.example:443/a",
            b"/a",
            id="explicit-default-port",
        ),
        pytest.param("https://nexus.example", b"https://nexus.example", b"/", id="bare-origin"),
        pytest.param(
            "https://nexus.example",
            b"https://nexus.example.evil/a",
            b"https://nexus.example.evil/a",
            id="longer-host",
        ),
        pytest.param(
            "https://nexus.example",
            b"http://nexus.example/a",
            b"http://nexus.example/a",
            id="other-scheme",
        ),
        pytest.param(
            "https://nexus.example:8443",
            b"https://nexus.example:8443/a?b",
            b"/a?b",
            id="custom-port",
        ),
        pytest.param(
            "https://nexus.example:8443",
            b"https://nexus.example/a",
            b"https://nexus.example/a",
            id="other-port",
        ),
        pytest.param(
            "https://nexus.example/base", b"https://nexus.example/base/a", b"/a", id="base-path"
        ),
        pytest.param(
            "https://nexus.example/base",
            b"https://nexus.example/basement",
            b"https://nexus.example/basement",
            id="base-prefix-only",
        ),
        pytest.param(
            "https://nexus.example/base",
            b"https://nexus.example/other",
            b"https://nexus.example/other",
            id="outside-base",
        ),
        pytest.param("http://[::1]:9000", b"http://[::1]:9000/a", b"/a", id="ipv6"),
        pytest.param("https://nexus.example", b"/relative", b"/relative", id="relative"),
    ],
)
def test_response_policy_rewrites_location(upstream: str, location: bytes, expected: bytes) -> None:
    assert ResponsePolicy(httpx.URL(upstream)).rewrite_location(location) == expected


def test_response_policy_drops_hop_by_hop_keeps_case_and_order() -> None:
    policy = ResponsePolicy(httpx.URL("https://nexus.example"))
    upstream = [
        (b"Set-Cookie", b"a=1"),
        (b"Connection", b"keep-alive, X-Hop"),
        (b"X-Hop", b"1"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Set-Cookie", b"b=2"),
    ]

    assert policy.apply(upstream) == [(b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2")]


def test_response_policy_never_redacts_length() -> None:
    # A key that happens to be all digits must not break the body's framing.
    policy = ResponsePolicy(httpx.URL("https://nexus.example"))
    headers = [(b"Content-Length", b"2"), (b"X-Debug", b"key=2")]

    assert policy.apply(headers, secret=b"2") == [
        (b"Content-Length", b"2"),
        (b"X-Debug", b"[redacted]"),
    ]
