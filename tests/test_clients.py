"""Real clients end to end: curl, Node.js fetch and httpx through the proxy to the stand-in."""

from __future__ import annotations

import hashlib
import json
import os
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from tests.conftest import KEY, RunningProxy
from tests.test_cli import start_proxy, subprocess_environment
from tests.upstream import Reply, StandInUpstream

MIB = 1024 * 1024
CLIENT_TIMEOUT = 20.0

# The stand-in blocks its event loop while it waits, so this stays under the
# proxy fixture's read_timeout of 5 s.
STREAM_WAIT = 3.0
FIRST_PIECE = b'{"records":[' + b"1," * 1000
LAST_PIECE = b"2]}"

LARGE_PIECES = 256  # number of 1 MiB pieces in each large body
MAX_PEAK_GROWTH = 64 * MIB


def _curl(*args: str) -> bytes:
    """Run curl with `args` (without reading ~/.curlrc) and return what -i printed."""
    result = subprocess.run(
        ["curl", "-q", "-sS", "-i", "--max-time", "10", *args],
        env=subprocess_environment(),
        capture_output=True,
        timeout=CLIENT_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


def _responses(output: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split curl -i output into (status, headers, body), interim 1xx responses first."""
    responses = []
    while True:
        head, _, output = output.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if not 100 <= status < 200:
            responses.append((status, headers, output))
            return responses
        responses.append((status, headers, b""))


def _final_response(output: bytes) -> tuple[int, dict[str, str], bytes]:
    return _responses(output)[-1]


def _random_file(path: Path, size: int) -> str:
    """Write `size` random bytes to `path` and return their SHA-256."""
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


# curl


def test_curl_query_reaches_upstream_unchanged(
    proxy: RunningProxy, upstream: StandInUpstream
) -> None:
    output = _curl(f"{proxy.url}/customer?page=1&email=a%2Bb%40x.com")

    assert _final_response(output)[0] == 200
    assert upstream.requests[0].target == b"/customer?page=1&email=a%2Bb%40x.com"


def test_curl_expect_continue_upload_arrives_intact(
    proxy: RunningProxy, upstream: StandInUpstream, tmp_path: Path
) -> None:
    digest = _random_file(tmp_path / "upload.bin", 2 * MIB)

    output = _curl(
        "-X", "PUT", "-H", "Expect: 100-continue", "--data-binary", f"@{tmp_path / 'upload.bin'}",
        f"{proxy.url}/customer/C1",
    )  # fmt: skip

    statuses = [status for status, _, _ in _responses(output)]
    request = upstream.requests[0]
    assert statuses == [100, 200]
    assert request.body_size == 2 * MIB
    assert request.body_sha256 == digest
    assert request.header("expect") == []


def test_curl_chunked_upload_arrives_chunked(
    proxy: RunningProxy, upstream: StandInUpstream, tmp_path: Path
) -> None:
    digest = _random_file(tmp_path / "upload.bin", 2 * MIB)

    output = _curl(
        "-H", "Transfer-Encoding: chunked", "--data-binary", f"@{tmp_path / 'upload.bin'}",
        f"{proxy.url}/integrations/documentstore/file",
    )  # fmt: skip

    request = upstream.requests[0]
    assert _final_response(output)[0] == 200
    assert request.chunked
    assert request.body_sha256 == digest


def test_curl_put_without_body_has_no_framing(
    proxy: RunningProxy, upstream: StandInUpstream
) -> None:
    output = _curl("-X", "PUT", f"{proxy.url}/mail/M1/sent")

    request = upstream.requests[0]
    assert _final_response(output)[0] == 200
    assert request.header("content-length") in ([], ["0"])
    assert request.header("transfer-encoding") == []
    assert request.body_size == 0


# Node.js fetch

NODE_CLIENT = """\
const [url, method, body] = process.argv.slice(2);
const init = { method, headers: { Authorization: "Bearer dummy" } };
if (body !== undefined) {
  init.body = body;
  init.headers["Content-Type"] = "application/json; charset=utf-8";
}
const response = await fetch(url, init);
process.stdout.write(JSON.stringify({ status: response.status, body: await response.text() }));
"""

NODE_REPLY = b'{"message":"Successfully processed your request","errors":null,"values":{"total":1}}'
NODE_JSON = '{"amount":"14729.80374332","currency":"EUR"}'


def _node(script: Path, *args: str) -> dict[str, Any]:
    result = subprocess.run(
        ["node", str(script), *args],
        env=subprocess_environment(),
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    output: dict[str, Any] = json.loads(result.stdout)
    return output


@pytest.mark.parametrize(
    ("method", "body"),
    [
        pytest.param("GET", None, id="get"),
        pytest.param("POST", NODE_JSON, id="post-json"),
    ],
)
def test_node_fetch_gets_key_replaced(
    method: str,
    body: str | None,
    proxy: RunningProxy,
    upstream: StandInUpstream,
    tmp_path: Path,
) -> None:
    script = tmp_path / "client.mjs"
    script.write_text(NODE_CLIENT)
    upstream.reply_with(Reply(body=NODE_REPLY))

    output = _node(script, f"{proxy.url}/token/payments", method, *([body] if body else []))

    request = upstream.requests[0]
    assert output["status"] == 200
    assert output["body"] == NODE_REPLY.decode()
    assert request.method == method
    assert request.header("authorization") == [f"Bearer {KEY}"]
    assert request.body == (body or "").encode()


# HTTPS upstream

TLS_REPLY = b'{"message":"Successfully processed your request","errors":null,"values":{"tls":true}}'


@pytest.fixture
def tls_upstream(tmp_path: Path) -> Iterator[tuple[StandInUpstream, Path]]:
    """A stand-in serving HTTPS as "localhost" and 127.0.0.1, and the path of its CA's PEM."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    with StandInUpstream(Reply(body=TLS_REPLY), ssl_context=context) as upstream:
        yield upstream, ca_path


def test_https_upstream_trusted_by_ca_bundle(
    tls_upstream: tuple[StandInUpstream, Path], make_proxy: Callable[..., RunningProxy]
) -> None:
    upstream, ca_path = tls_upstream
    proxy = make_proxy(upstream.url, ca_bundle=ca_path)

    status, _, body = _final_response(_curl(f"{proxy.url}/customer"))

    assert upstream.url.startswith("https://")
    assert status == 200
    assert body == TLS_REPLY
    assert upstream.requests[0].header("authorization") == [f"Bearer {KEY}"]


def test_https_upstream_untrusted_returns_502(
    tls_upstream: tuple[StandInUpstream, Path], make_proxy: Callable[..., RunningProxy]
) -> None:
    upstream, _ = tls_upstream
    proxy = make_proxy(upstream.url)

    status, headers, body = _final_response(_curl(f"{proxy.url}/customer"))

    envelope = json.loads(body)
    assert status == 502
    assert headers["x-nexus-proxy-error"] == "ProxyUpstreamUnreachable"
    assert envelope["errors"] == ["ProxyUpstreamUnreachable"]
    assert envelope["values"]["upstreamReached"] is False
    assert upstream.requests == []


# Streaming with httpx


def test_stream_upload_reaches_upstream_before_it_ends(
    proxy: RunningProxy, upstream: StandInUpstream
) -> None:
    started: list[bool] = []

    def body() -> Iterator[bytes]:
        yield FIRST_PIECE
        started.append(upstream.body_started.wait(STREAM_WAIT))
        yield LAST_PIECE

    response = httpx.put(
        f"{proxy.url}/integrations/documentstore/file", content=body(), timeout=CLIENT_TIMEOUT
    )

    assert response.status_code == 200
    assert started == [True]
    assert upstream.requests[0].body == FIRST_PIECE + LAST_PIECE


def test_stream_download_reaches_client_before_it_ends(
    proxy: RunningProxy, upstream: StandInUpstream
) -> None:
    first_read = threading.Event()
    read_in_time: list[bool] = []

    def pieces() -> Iterator[bytes]:
        yield FIRST_PIECE
        read_in_time.append(first_read.wait(STREAM_WAIT))
        yield LAST_PIECE

    upstream.reply_with(Reply(chunks=pieces(), chunked=True))
    url = f"{proxy.url}/integrations/documentstore/file?filePath=folder/name.pdf"
    with httpx.stream("GET", url, timeout=CLIENT_TIMEOUT) as response:
        chunks = response.iter_raw()
        received = next(chunks)
        first_read.set()
        received += b"".join(chunks)

    assert received == FIRST_PIECE + LAST_PIECE
    assert read_in_time == [True]


# Large bodies through the proxy as a subprocess, with its peak memory


def _peak_memory(pid: int) -> int:
    """Return the peak resident set size (VmHWM) of process `pid` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def _large_pieces(digest: Any) -> Iterator[bytes]:
    """Yield LARGE_PIECES distinct 1 MiB pieces, adding each to `digest`."""
    block = os.urandom(MIB)
    for index in range(LARGE_PIECES):
        piece = index.to_bytes(4, "big") + block[4:]
        digest.update(piece)
        yield piece


@pytest.mark.timeout(20)
def test_large_upload_streams_in_bounded_memory(upstream: StandInUpstream) -> None:
    sent = hashlib.sha256()
    upstream.reply_with(Reply(keep_body=False))

    # max_body_size is set above the body size, which the default may not allow.
    limit = str(2 * LARGE_PIECES * MIB)
    with (
        start_proxy(upstream.url, "--max-body-size", limit) as proxy,
        httpx.Client(timeout=CLIENT_TIMEOUT) as client,
    ):
        # The warm-up request loads what every request needs, so the baseline includes it.
        client.put(f"{proxy.url}/warm-up", content=b"{}")
        baseline = _peak_memory(proxy.pid)
        response = client.put(
            f"{proxy.url}/integrations/documentstore/file", content=_large_pieces(sent)
        )
        peak = _peak_memory(proxy.pid)

    assert response.status_code == 200
    request = upstream.requests[-1]
    assert request.body_size == LARGE_PIECES * MIB
    assert request.body_sha256 == sent.hexdigest()
    assert peak - baseline < MAX_PEAK_GROWTH


@pytest.mark.timeout(20)
def test_large_download_streams_in_bounded_memory(upstream: StandInUpstream) -> None:
    sent = hashlib.sha256()
    received = hashlib.sha256()
    size = 0

    with start_proxy(upstream.url) as proxy, httpx.Client(timeout=CLIENT_TIMEOUT) as client:
        client.get(f"{proxy.url}/warm-up")
        baseline = _peak_memory(proxy.pid)
        upstream.reply_with(Reply(chunks=_large_pieces(sent), chunked=True))
        url = f"{proxy.url}/integrations/documentstore/file?filePath=folder/large.bin"
        with client.stream("GET", url) as response:
            for chunk in response.iter_raw():
                received.update(chunk)
                size += len(chunk)
        peak = _peak_memory(proxy.pid)

    assert response.status_code == 200
    assert size == LARGE_PIECES * MIB
    assert received.hexdigest() == sent.hexdigest()
    assert peak - baseline < MAX_PEAK_GROWTH
