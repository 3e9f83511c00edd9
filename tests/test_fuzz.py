"""Robustness: random request lines, headers and bodies over raw sockets.

After every random request the proxy must still serve a normal one, must never
respond 500 itself, and must only ever forward origin-form requests carrying
exactly one Authorization header, the key's.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import KEY, serve_proxy
from tests.upstream import StandInUpstream

pytestmark = pytest.mark.timeout(120)

# How long one random request may keep its connection before the test moves on.
# Most end much sooner: the proxy responds 400 and closes, or sends a full response.
READ_WINDOW = 0.25

TOKEN_CHARS = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
PATH_CHARS = b"abcdefghijklmnopqrstuvwxyzABCXYZ0123456789-._~%/?#[]@!$&'()*+,;=|{}^`\\"
# Replaced by the stand-in upstream's own host and port before sending, so that even a
# proxy that wrongly followed an absolute-form target would only reach the stand-in.
UPSTREAM = b"UPSTREAM"


def _from(alphabet: bytes, max_size: int) -> st.SearchStrategy[bytes]:
    return st.binary(max_size=max_size).map(
        lambda raw: bytes(alphabet[byte % len(alphabet)] for byte in raw)
    )


def _mostly(valid: st.SearchStrategy[bytes], damaged: st.SearchStrategy[bytes]) -> Any:
    """Draw from `valid` about three times in four, so most requests get past the parser.

    `valid` is the branch that Hypothesis shrinks towards, so a failure shrinks to the
    least damaged request that still fails.
    """
    return st.integers(0, 3).flatmap(lambda pick: damaged if pick == 3 else valid)


methods = _mostly(
    st.sampled_from(
        [b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE"]
    ),
    st.one_of(
        st.sampled_from([b"get", b"G ET", b"", b"GET\x00", b"PRI"]),
        _from(TOKEN_CHARS, 12),
        st.binary(max_size=12),
    ),
)
targets = _mostly(
    _from(PATH_CHARS, 200).map(lambda raw: b"/" + raw),
    st.one_of(
        st.sampled_from(
            [
                b"*",
                b"http://" + UPSTREAM + b"/customer",
                UPSTREAM,
                b"//other.host/x",
                b"/_proxy/health",
                b"/_proxy/../customer",
                b"/%00",
                b"/a b",
                b"/" + b"a" * 70_000,
            ]
        ),
        st.binary(max_size=200).map(lambda raw: b"/" + raw),
        st.binary(max_size=40),
    ),
)
versions = _mostly(
    st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]),
    st.one_of(
        st.sampled_from([b"HTTP/2.0", b"HTTP/0.9", b"http/1.1", b"HTTP/1.1 x", b""]),
        st.binary(max_size=12),
    ),
)
header_names = _mostly(
    st.one_of(
        _from(TOKEN_CHARS, 20).filter(bool),
        st.sampled_from(
            [
                b"Host",
                b"Content-Length",
                b"Transfer-Encoding",
                b"Connection",
                b"Expect",
                b"Authorization",
                b"Upgrade",
                b"TE",
                b"Trailer",
                b"Proxy-Authorization",
                b"X-Request-ID",
                b"api_version",
                b"request_iso8601",
            ]
        ),
    ),
    st.one_of(
        st.sampled_from([b"Content-Length ", b" Transfer-Encoding", b"Host\x00"]),
        st.binary(min_size=1, max_size=30),
    ),
)
header_values = _mostly(
    st.one_of(
        _from(PATH_CHARS + b" \t", 60),
        st.sampled_from(
            [
                b"chunked",
                b"gzip, chunked",
                b"chunked, identity",
                b"0",
                b"5",
                b"-1",
                b"+5",
                b"0x10",
                b"99999999999999999999999",
                b"close",
                b"keep-alive, Upgrade",
                b"100-continue",
                b"Bearer client-own-token",
                b"Bearer ",
                b"websocket",
            ]
        ),
    ),
    st.one_of(st.sampled_from([b"\x00", b"a" * 70_000]), st.binary(max_size=100)),
)
separators = _mostly(st.just(b": "), st.sampled_from([b":", b" : ", b"", b":\r\n "]))
headers = st.lists(st.tuples(header_names, separators, header_values), max_size=12)
bodies = st.one_of(
    st.sampled_from([b"", b"0\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n", b"zz\r\nx\r\n", b"5\r\nhel"]),
    st.binary(max_size=2000),
)
line_ends = _mostly(st.just(b"\r\n"), st.sampled_from([b"\n", b"\r", b"\r\r\n"]))


@st.composite
def raw_requests(draw: st.DrawFn) -> bytes:
    """A request that is mostly HTTP/1.1 shaped, with random damage, or random bytes."""
    if draw(st.integers(0, 9)) == 9:
        return draw(st.binary(min_size=1, max_size=500))
    end = draw(line_ends)
    line = b" ".join([draw(methods), draw(targets), draw(versions)])
    fields = [name + separator + value for name, separator, value in draw(headers)]
    return end.join([line, *fields, b"", b""]) + draw(bodies)


def _offer(port: int, request: bytes) -> bytes:
    """Send `request`, then read for at most READ_WINDOW seconds or until a response is complete."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(request)
        except OSError:
            return received  # the proxy rejected the head and closed while it was sent
        deadline = time.monotonic() + READ_WINDOW
        while not _is_complete(received):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            try:
                piece = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not piece:
                break
            received += piece
    return received


def _is_complete(response: bytes) -> bool:
    head, separator, body = response.partition(b"\r\n\r\n")
    if not separator:
        return False
    for line in head.lower().split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name == b"content-length" and value.strip().isdigit():
            return len(body) >= int(value)
    return False


def test_fuzz_proxy_survives_random_requests() -> None:
    with (
        StandInUpstream() as upstream,
        serve_proxy(upstream.url, client_header_timeout=1, client_body_timeout=1) as proxy,
        httpx.Client(timeout=5) as client,
    ):

        @settings(
            max_examples=400,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(raw_requests())
        def survives(request: bytes) -> None:
            upstream_address = upstream.url.removeprefix("http://").encode()
            response = _offer(proxy.port, request.replace(UPSTREAM, upstream_address))

            assert not response.startswith(b"HTTP/1.1 500"), response[:300]
            assert client.get(proxy.url + "/customer").status_code == 200

        survives()
        forwarded = list(upstream.requests)

    assert all(request.target.startswith(b"/") for request in forwarded)
    assert all(request.header("authorization") == [f"Bearer {KEY}"] for request in forwarded)
