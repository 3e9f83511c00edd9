"""Shared fixtures: the proxy served by real uvicorn on loopback, and the stand-in upstream."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import uvicorn

from nexus_proxy.app import NexusProxy
from nexus_proxy.credentials import Credential, build_credential
from nexus_proxy.server import uvicorn_config
from nexus_proxy.settings import Settings
from tests.upstream import StandInUpstream

KEY = "nx-test-key-3f9a1c"
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No NEXUS_PROXY_* or proxy variable of the machine leaks into a test.

    Files the test writes get mode 0600, as secret files should; tests of the
    permission rule set modes themselves.
    """
    for name in list(os.environ):
        if name.startswith("NEXUS_PROXY_") or name.upper() in PROXY_VARS:
            monkeypatch.delenv(name)
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


class _Server(uvicorn.Server):
    """uvicorn's server, with an event set once it serves."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


class RunningProxy:
    """A proxy serving in a background thread."""

    def __init__(self, url: str, settings: Settings, app: NexusProxy) -> None:
        self.url = url
        self.port = int(url.rsplit(":", 1)[1])
        self.settings = settings
        self.app = app


@contextmanager
def serve_proxy(
    upstream_url: str, credential: Credential | None = None, **overrides: Any
) -> Iterator[RunningProxy]:
    """Serve the real app with uvicorn on an ephemeral loopback port.

    Without `credential`, the one the settings configure is built.
    """
    options: dict[str, Any] = {
        "upstream_url": upstream_url,
        "api_key": KEY,
        "port": 0,
        "egress_proxy": "",
        "connect_timeout": 2,
        "read_timeout": 5,
        "pool_timeout": 2,
    }
    options.update(overrides)
    settings = Settings(**options)
    app = NexusProxy(settings, credential or build_credential(settings))
    config = uvicorn_config(app, settings)
    sock = config.bind_socket()
    server = _Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert server.ready.wait(10), "the proxy did not start"
        yield RunningProxy(f"http://127.0.0.1:{sock.getsockname()[1]}", settings, app)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        assert not thread.is_alive(), "the proxy did not stop"


@pytest.fixture
def upstream() -> Iterator[StandInUpstream]:
    """A stand-in Nexus API on loopback, answering the success envelope."""
    with StandInUpstream() as server:
        yield server


@pytest.fixture
def proxy(upstream: StandInUpstream) -> Iterator[RunningProxy]:
    """The proxy in front of `upstream`, with default settings."""
    with serve_proxy(upstream.url) as running:
        yield running


@pytest.fixture
def make_proxy() -> Iterator[Callable[..., RunningProxy]]:
    """Start proxies with other settings; each is stopped at the end of the test."""
    with _Stack() as stack:
        yield stack.start


class _Stack:
    def __init__(self) -> None:
        self.contexts: list[Any] = []

    def __enter__(self) -> _Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        for context in reversed(self.contexts):
            context.__exit__(None, None, None)

    def start(self, upstream_url: str, **overrides: Any) -> RunningProxy:
        context = serve_proxy(upstream_url, **overrides)
        running = context.__enter__()
        self.contexts.append(context)
        return running


def raw_exchange(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes to the proxy and read until it closes or a full response arrived."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        return _read_response(sock)


def _read_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = _content_length(head)
    while length is not None and len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    if length is None and b"transfer-encoding: chunked" in head.lower():
        while not body.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    return head + b"\r\n\r\n" + body


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return None
